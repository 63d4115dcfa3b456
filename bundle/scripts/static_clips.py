"""Training clips with synthetic motion, made from single annotated images (the static-image stage).

STCN and XMem pretrain on still images before any video: each image becomes a short clip in which the object moves
and deforms between frames, so the memory learns to follow objects in thousands of scenes instead of the few dozen
training videos. Sources are every annotated frame of the training split and image/mask folders such as
Kvasir-SEG (``images/<id>.jpg`` with ``masks/<id>.png``).

A clip is built in three steps, each declared as MONAI transforms in ``pretrain_static.json``:

1. ``clip_transforms`` (one draw for the whole clip): the crop of the source image the clip lives in;
2. copy-paste (here, with probability ``paste_prob``): an object cut out of *another* source, with its mask, is pasted
   on every frame along its own path (drift, rotation, scale change, an oscillation that can carry it out of the crop
   and back), over whatever it covers, so objects meet new backgrounds and sometimes overlap;
3. ``frame_transforms`` (an independent draw per frame): affine and elastic deformation, photometric changes (contrast,
   brightness, hue, blur, specular highlights), which make the motion between frames.

Items have ``ClipDataset``'s layout, so the training step is the same for both stages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor

from scripts.annotations import read_label_map
from scripts.data import CLIP_TRIES, FRAME_SUFFIXES, list_sequences, remap_objects, short_side_shape, store
from scripts.errors import InputError
from scripts.readers import read_rgb

__all__ = [
    "RandHueShiftd",
    "RandSpecularHighlightsd",
    "StaticImage",
    "StaticClipDataset",
    "held_out",
    "list_static_images",
]

# one still in this many of an image/mask folder is held out of training (`held_out`)
HELD_OUT_EVERY = 5

# NTSC YIQ: hue is the angle in the I-Q plane, so a hue shift is a rotation there
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class StaticImage:
    """One annotated still: an RGB image and its label map (0 background, k > 0 object k)."""

    source: str
    image: Path
    mask: Path


def held_out(image_id: str) -> bool:
    """Whether a still of an image/mask folder is held out of training: one in ``HELD_OUT_EVERY``, chosen by a hash
    of its id, so the choice needs no list, does not depend on which other stills are present, and is the same on
    every machine (the held-out stills make the unseen-object clips of ``heldout_clips``)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def list_static_images(
    image_dirs: str | Iterable[str] = (),
    davis_roots: str | Iterable[str] = (),
    split_file: str | Path | None = None,
    part: str = "train",
) -> list[StaticImage]:
    """Stills from image/mask folders (``<dir>/images/<id>.*`` + ``<dir>/masks/<id>.png``) and every frame of the
    training split of DAVIS roots (comma-separated strings are accepted, as in the configs).

    ``part`` picks the folders' stills: ``train`` those not `held_out` (the static stage), ``heldout`` only the held-out
    ones (DAVIS roots give none: their held-out part is the val split), ``all`` every still (packing)."""
    if part not in ("train", "heldout", "all"):
        raise ValueError(f"part must be train, heldout or all, got {part!r}")
    found: list[StaticImage] = []
    for folder in _split(image_dirs):
        root = Path(folder)
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise InputError(f"{root}: an image folder needs images/ and masks/ (mask <id>.png for image <id>.jpg)")
        for image in sorted(p for p in images.iterdir() if p.suffix.lower() in FRAME_SUFFIXES):
            mask = masks / f"{image.stem}.png"
            if not mask.is_file():
                raise InputError(f"{mask}: mask missing for {image}")
            if part == "all" or held_out(image.stem) == (part == "heldout"):
                found.append(StaticImage(root.name, image, mask))
    roots = _split(davis_roots) if part != "heldout" else []
    if roots:
        for seq in list_sequences(roots, "train", split_file):
            found += [StaticImage(seq.key, f, m) for f, m in zip(seq.frames, seq.masks)]
    if not found and part == "heldout":
        raise InputError(f"no held-out still in {image_dirs}: one in {HELD_OUT_EVERY} image ids is held out (by hash)")
    if not found:
        raise InputError("no static training image found: give image folders (images/, masks/) or DAVIS roots")
    return found


def _split(value: str | Iterable[str]) -> list[str]:
    values = [value] if isinstance(value, (str, Path)) else list(value)
    return [r.strip() for v in values for r in str(v).split(",") if r.strip()]


class RandHueShiftd(RandomizableTransform, MapTransform):
    """Rotate the hue of RGB images (C×H×W, C a multiple of 3, values in [0, 1]) by up to ``max_degrees``.

    MONAI has no hue transform; a rotation in the YIQ chroma plane keeps luminance, as endoscope white balance does.
    """

    def __init__(self, keys: KeysCollection, max_degrees: float = 10.0, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.max_degrees = max_degrees
        self.angle = 0.0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.angle = math.radians(self.R.uniform(-self.max_degrees, self.max_degrees))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        c, s = math.cos(self.angle), math.sin(self.angle)
        rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        matrix = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=False).float()
            rgb = img.reshape(-1, 3, *img.shape[-2:])
            d[key] = torch.einsum("ij,njhw->nihw", matrix, rgb).reshape(img.shape).clamp(0, 1)
        return d


class RandSpecularHighlightsd(RandomizableTransform, MapTransform):
    """Add 1..``max_spots`` specular highlights (soft saturated ellipses, screen-blended), as the endoscope's light
    makes on wet mucosa; images C×H×W in [0, 1]. Labels are untouched: highlights lie on the tissue."""

    def __init__(
        self, keys: KeysCollection, prob: float = 0.3, max_spots: int = 4, radius: tuple[float, float] = (0.01, 0.05)
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.max_spots, self.radius = max_spots, radius
        self.spots: list[tuple[float, ...]] = []

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        n = self.R.randint(1, self.max_spots + 1)
        self.spots = [
            (self.R.uniform(0, 1), self.R.uniform(0, 1), self.R.uniform(*self.radius), self.R.uniform(*self.radius))
            + (self.R.uniform(0, math.pi), self.R.uniform(0.6, 1.0))
            for _ in range(n)
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=False).float()
            h, w = img.shape[-2:]
            y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
            light = torch.zeros(h, w)
            for cx, cy, rx, ry, angle, strength in self.spots:
                u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
                v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
                light = torch.maximum(light, strength * torch.exp(-(((u / rx) ** 2 + (v / ry) ** 2) ** 2)))
            d[key] = 1 - (1 - img) * (1 - light)
        return d


class StaticClipDataset(torch.utils.data.Dataset):
    """Random clips of ``num_frames`` frames, each made from one still (see the module docstring).

    Draws follow ``ClipDataset``: item ``i`` takes all its randomness from ``(seed, i)``, any ``i >= 0`` is valid, and
    the items have the same keys and shapes (``frame_index`` is 0..T−1). Sources are drawn so that each ``source``
    (dataset or sequence) gets an equal share, as ``ClipDataset`` does per dataset. Stills are decoded once, with
    the short side resized to ``load_size``, and cached (per worker process).
    """

    def __init__(
        self,
        images: list[StaticImage],
        clip_transforms: Compose,
        frame_transforms: Compose,
        num_frames: int = 3,
        crop_size: int = 256,
        max_objects: int = 2,
        samples_per_epoch: int = 1000,
        paste_prob: float = 0.5,
        load_size: int = 320,
        seed: int = 0,
        cache: bool = True,
        storage_transforms: Compose | None = None,
    ) -> None:
        if not images:
            raise ValueError("StaticClipDataset needs at least one image")
        if min(num_frames, crop_size, max_objects, samples_per_epoch, load_size) < 1:
            raise ValueError("num_frames, crop_size, max_objects, samples_per_epoch and load_size must be >= 1")
        self.by_source: dict[str, list[StaticImage]] = {}
        for image in images:
            self.by_source.setdefault(image.source.split("/")[0], []).append(image)
        self.sources = sorted(self.by_source)
        self.clip_transforms, self.frame_transforms = clip_transforms, frame_transforms
        self.num_frames, self.crop_size, self.max_objects = num_frames, crop_size, max_objects
        self.samples_per_epoch, self.paste_prob, self.load_size, self.seed = (
            samples_per_epoch,
            paste_prob,
            load_size,
            seed,
        )
        self.storage_transforms = storage_transforms
        self.cache: dict[Path, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _load(self, still: StaticImage) -> tuple[torch.Tensor, torch.Tensor]:
        """3×H×W float image in [0, 1] and 1×H×W float labels, short side ``load_size``."""
        if self.cache is not None and still.image in self.cache:
            return self.cache[still.image]
        rgb = read_rgb(still.image)
        labels = read_label_map(still.mask)
        if labels.shape != rgb.shape[:2]:
            raise InputError(f"{still.mask}: mask is {labels.shape} but {still.image} is {rgb.shape[:2]}")
        shape = short_side_shape(*labels.shape, self.load_size)
        image = F.interpolate(
            torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255,
            shape,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].clamp(0, 1)
        label = F.interpolate(torch.from_numpy(labels)[None, None].float(), shape, mode="nearest-exact")[0]
        if self.cache is not None:
            self.cache[still.image] = (image, label)
        return image, label

    def _draw(self, rng: np.random.Generator) -> StaticImage:
        images = self.by_source[self.sources[rng.integers(len(self.sources))]]
        return images[rng.integers(len(images))]

    def _paste_path(self, rng: np.random.Generator, patch_hw: tuple[int, int]) -> list[torch.Tensor]:
        """Per frame, the 2×3 `affine_grid` matrix that places the patch: drift, oscillation, rotation, scaling."""
        t = np.arange(self.num_frames)
        size = rng.uniform(0.25, 0.6)  # the patch's long side, as a fraction of the crop
        ph, pw = patch_hw
        half = np.array([pw, ph]) / max(ph, pw) * size  # patch half-extent in normalised units ([-1, 1] is the crop)
        centre0 = rng.uniform(-0.6, 0.6, 2)
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-9
        amplitude, omega, phase = rng.uniform(0, 1.2), rng.uniform(0.4, 1.5), rng.uniform(0, 2 * np.pi)
        drift = rng.normal(0, 0.08, 2)
        centres = (
            centre0 + np.outer(t, drift) + np.outer(np.sin(omega * t + phase) - np.sin(phase), direction) * amplitude
        )
        angles = rng.uniform(-np.pi, np.pi) + rng.uniform(-0.2, 0.2) * t
        scales = np.exp(rng.uniform(-0.08, 0.08) * t)
        thetas = []
        for centre, angle, scale in zip(centres, angles, scales):
            c, s = math.cos(angle), math.sin(angle)
            inverse = np.diag(1 / (half * scale)) @ np.array([[c, s], [-s, c]])  # crop units → patch units
            thetas.append(torch.tensor(np.concatenate([inverse, -inverse @ centre[:, None]], 1), dtype=torch.float32))
        return thetas

    def _donor(self, rng: np.random.Generator, base: StaticImage) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A random object of another still, cut to its bounding box: 3×h×w image and 1×h×w mask."""
        for _ in range(CLIP_TRIES):
            donor = self._draw(rng)
            if donor.image == base.image:
                continue
            image, label = self._load(donor)
            objects = torch.unique(label)
            objects = objects[objects > 0]
            if len(objects) == 0:
                continue
            mask = (label == objects[rng.integers(len(objects))]).float()
            rows, cols = torch.nonzero(mask[0].any(1)).flatten(), torch.nonzero(mask[0].any(0)).flatten()
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            return image[:, y0:y1, x0:x1], mask[:, y0:y1, x0:x1]
        return None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        self.clip_transforms.set_random_state(seed=int(rng.integers(2**31)))
        self.frame_transforms.set_random_state(seed=int(rng.integers(2**31)))
        for _ in range(CLIP_TRIES):
            still = self._draw(rng)
            image, label = self._load(still)
            base = self.clip_transforms({"image": image, "label": label})
            base_image = convert_to_tensor(base["image"], track_meta=False).float()
            base_label = convert_to_tensor(base["label"], track_meta=False).float()
            donor = self._donor(rng, still) if rng.random() < self.paste_prob else None
            paste_id = min(int(base_label.max()) + 1, 255)
            thetas = self._paste_path(rng, tuple(donor[1].shape[-2:])) if donor is not None else None
            frames, labels = [], []
            for t in range(self.num_frames):
                frame, frame_label = base_image, base_label
                if donor is not None:
                    patch = torch.cat(donor, 0)[None]
                    grid = F.affine_grid(thetas[t][None], [1, 4, *frame.shape[-2:]], align_corners=False)
                    warped = F.grid_sample(patch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
                    alpha = warped[3:].clamp(0, 1)
                    frame = frame * (1 - alpha) + warped[:3] * alpha
                    frame_label = torch.where(alpha > 0.5, float(paste_id), frame_label)
                out = self.frame_transforms({"image": frame, "label": frame_label})
                frames.append(convert_to_tensor(out["image"], track_meta=False).float().clamp(0, 1))
                labels.append(convert_to_tensor(out["label"], track_meta=False).round().long())
            label = torch.stack(labels)  # T×1×H×W
            objects = np.flatnonzero(torch.bincount(label[0].flatten(), minlength=256)[1:].numpy()) + 1
            if not len(objects):
                continue
            chosen = rng.permutation(objects)[: self.max_objects]
            return {
                "image": store(self.storage_transforms, torch.stack(frames), rng),
                "label": remap_objects(label, chosen),
                "frame_index": torch.arange(self.num_frames, dtype=torch.int64),
                "num_objects": len(chosen),
            }
        raise RuntimeError(f"no clip with an object in its first frame found in {CLIP_TRIES} tries (item {index})")
