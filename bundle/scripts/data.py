"""Sequences and clip sampling for training: splits, frame gaps, augmentation applied identically to a clip.

Data roots use the DAVIS layout, scanned by `scripts.davis` (``list_sequences``, re-exported here); the dataset name
is the root's folder name, so sequences are keyed ``"<dataset>/<sequence>"`` in ``configs/splits.json``.

The shipped split (``configs/splits.json``) holds out whole sequences, never frames of one sequence, so validation
measures propagation on unseen videos:

- ``cvc_clinicdb``: every fifth sequence of the sorted list from the second on (cvc01, cvc07, cvc13, cvc20, cvc26;
  116 of 502 frames), spread over the recording order rather than the first five.
- ``vocalfolds``: one sequence per patient (patient1_seq3, patient2_seq7; 148 of 466 frames), so both patients are
  seen in training and the longest sequence (patient2_seq8, 186 frames) stays in train.
- ``echo`` (the synthetic echo set): echo00-echo07 train, echo08 and echo09 val.

Sequences missing from the split file count as ``train``, so a new dataset trains without editing the split.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    MapTransform,
    Randomizable,
)
from monai.utils import convert_to_tensor, ensure_tuple_rep

from scripts.annotations import read_label_map
from scripts.davis import DEFAULT_SPLIT_FILE, SPLITS, Sequence, list_sequences, load_split  # noqa: F401 (re-exported)
from scripts.errors import InputError
from scripts.inferer import short_side_shape
from scripts.readers import FRAME_SUFFIXES, read_rgb  # noqa: F401 (FRAME_SUFFIXES re-exported: static_clips)

__all__ = [
    "DEFAULT_SPLIT_FILE",
    "ClipDataset",
    "RandResizedCropd",
    "Sequence",
    "ShortSideResized",
    "gap_curriculum",
    "list_sequences",
    "remap_objects",
    "load_split",
    "clip_transforms",
    "parse_dataset_weights",
]

CROP_TRIES = 5  # crops tried before dropping objects that fell outside the first frame
CLIP_TRIES = 50  # clips tried before giving up on finding an annotated first frame


def gap_curriculum(epoch: int, max_epochs: int, start: int, peak: int, end: int) -> int:
    """Maximum frame gap for ``epoch``: linear from ``start`` to ``peak`` over the first half, then to ``end``.

    Small gaps first let the memory learn easy propagation; large gaps mid-training teach long-range matching; the
    final shrink matches the frame rate seen at inference. ``epoch`` outside ``[0, max_epochs]`` is clamped.
    """
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be positive, got {max_epochs}")
    half = max_epochs / 2
    epoch = min(max(epoch, 0), max_epochs)
    if epoch <= half:
        gap = start + (peak - start) * epoch / half
    else:
        gap = peak + (end - peak) * (epoch - half) / (max_epochs - half)
    return max(1, math.floor(gap + 0.5))


def _resize(img: torch.Tensor, shape: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``C×H×W`` with a torch mode ("bilinear" is antialiased, much faster than MONAI's Gaussian smoothing)."""
    smooth = mode == "bilinear"
    return F.interpolate(img[None], shape, mode=mode, antialias=smooth, align_corners=False if smooth else None)[0]


class ShortSideResized(MapTransform):
    """Resize ``C×H×W`` tensors so the short side equals ``size``, keeping the aspect ratio (MONAI has no such mode).

    ``mode`` is a ``torch.nn.functional.interpolate`` mode per key: "bilinear" for images, "nearest-exact" for labels.
    """

    def __init__(self, keys: KeysCollection, size: int, mode: str | tuple[str, ...] = "bilinear") -> None:
        super().__init__(keys)
        self.size = size
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = _resize(d[key], short_side_shape(*d[key].shape[-2:], self.size), mode)
        return d


class RandResizedCropd(Randomizable, MapTransform):
    """Crop a random box and resize it to ``size × size``, the same box for every key.

    The box side is ``scale`` times the short side with aspect ratio drawn log-uniformly from ``ratio``, so zoom and
    mild anisotropy are one interpolation, unlike ``RandSpatialCropd(random_size=True)`` whose independent side lengths
    distort up to 2×. ``mode`` is a torch interpolation mode per key, as in :class:`ShortSideResized`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mode: str | tuple[str, ...] = "bilinear",
    ) -> None:
        MapTransform.__init__(self, keys)
        self.scale, self.ratio = scale, ratio
        self.size, self.mode = size, ensure_tuple_rep(mode, len(self.keys))
        self.box = (0, 0, 1, 1)

    def randomize(self, shape: tuple[int, int]) -> None:
        h, w = shape
        side = self.R.uniform(*self.scale) * min(h, w)
        aspect = math.exp(self.R.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        bh = min(h, max(1, round(side / math.sqrt(aspect))))
        bw = min(w, max(1, round(side * math.sqrt(aspect))))
        top, left = self.R.randint(0, h - bh + 1), self.R.randint(0, w - bw + 1)
        self.box = (top, left, top + bh, left + bw)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(tuple(d[self.first_key(d)].shape[-2:]))
        y0, x0, y1, x1 = self.box
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = _resize(d[key][..., y0:y1, x0:x1], (self.size, self.size), mode)
        return d


def clip_transforms(crop_size: int) -> Compose:
    """Deterministic clip transforms: short side to ``crop_size``, centre crop (no augmentation).

    A clip is stacked along channels (``image`` (3T)×H×W in [0, 1], ``label`` T×H×W), so every random draw of a
    transform applies to every frame alike and the only motion within a clip is the video's own. The training
    augmentation (crop, flip, rotation, gamma, brightness) is declared in ``train.json`` (``train#transforms``).
    """
    keys = ("image", "label")
    return Compose(
        [ShortSideResized(keys, crop_size, ("bilinear", "nearest-exact")), CenterSpatialCropd(keys, crop_size)]
    )


def store(storage_transforms: Compose | None, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The finished clip (T×3×H×W in [0, 1]) through ``storage_transforms`` (both datasets), seeded from the item's
    ``rng`` after every other draw, so a clip is the same clip with or without them, only stored differently."""
    if storage_transforms is None:
        return image
    storage_transforms.set_random_state(seed=int(rng.integers(2**31)))
    return convert_to_tensor(storage_transforms({"image": image})["image"], track_meta=False).float().clamp(0, 1)


def parse_dataset_weights(text: str) -> dict[str, float]:
    """``"vocalfolds=2,davis2016=0.5"`` → ``{"vocalfolds": 2.0, "davis2016": 0.5}``; ``""`` → ``{}`` (equal shares).

    The `--dataset_weights` flag: a dataset's share of clips is its weight over the sum of the weights, a dataset not
    named weighs 1. Why a flag: a small dataset (vocalfolds, 4 training videos) erodes when a large one is added at
    an equal share (training_log.md, session 6), and the remedy is a share, not a config edit.
    """
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in str(text or "").split(","))):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or not math.isfinite(weight) or weight < 0:
            raise InputError(
                f"--dataset_weights: {item!r} is not NAME=WEIGHT with a weight >= 0 (e.g. vocalfolds=2,davis2016=0.5)"
            )
        weights[name.strip()] = weight
    return weights


def remap_objects(label: torch.Tensor, objects: Iterable[int]) -> torch.Tensor:
    """Label values → object numbers: ``objects[i]`` becomes i + 1, every other value 0 (background)."""
    objects = [int(k) for k in objects]
    lut = torch.zeros(256, dtype=torch.long)
    lut[torch.tensor(objects, dtype=torch.long)] = torch.arange(1, len(objects) + 1)
    return lut[label.long()]


class ClipDataset(torch.utils.data.Dataset):
    """Random training clips: ``num_frames`` frames of one sequence with up to ``max_objects`` objects.

    Each dataset gets a share of clips whatever its number of sequences (equal, or ``dataset_weights``: name →
    weight, 1 for a dataset not named), then sequences are drawn uniformly.
    Item ``i`` draws all its randomness from ``(seed, i)``: the same pair gives the same clip, and DataLoader workers,
    which receive different indices, never repeat each other. Any ``i >= 0`` is valid, not only ``i < len``, so a
    sampler that offsets indices by ``epoch × len`` (``scripts.training.ResumableSampler``) gets new clips each epoch.
    ``max_gap`` is read at every item so a handler can change it per epoch (the gap curriculum); with
    ``persistent_workers`` that change would not reach the workers.

    ``cache`` keeps decoded frames in memory (per worker process), since JPEG decoding dominates the cost of a clip.
    ``transforms`` (the augmentation ``train.json`` declares) get the clip stacked along channels (see
    ``clip_transforms``); without them clips are only resized and centre-cropped to ``crop_size``.
    ``storage_transforms`` get the finished clip (``image`` T×3×H×W): how a video is stored
    (``storage_augment``), after every other change, as a codec comes after the camera.
    """

    def __init__(
        self,
        sequences: list[Sequence],
        num_frames: int = 3,
        max_gap: int = 5,
        crop_size: int = 256,
        max_objects: int = 2,
        samples_per_epoch: int = 1000,
        seed: int = 0,
        cache: bool = True,
        transforms: Compose | None = None,
        storage_transforms: Compose | None = None,
        dataset_weights: Mapping[str, float] | str | None = None,
    ) -> None:
        if not sequences:
            raise ValueError("ClipDataset needs at least one sequence (check the data roots and the split)")
        if min(num_frames, max_gap, crop_size, max_objects, samples_per_epoch) < 1:
            raise ValueError("num_frames, max_gap, crop_size, max_objects and samples_per_epoch must be >= 1")
        self.by_dataset: dict[str, list[Sequence]] = {}
        for s in sequences:
            self.by_dataset.setdefault(s.dataset, []).append(s)
        self.datasets = sorted(self.by_dataset)
        weights = (
            parse_dataset_weights(dataset_weights) if isinstance(dataset_weights, str) else dict(dataset_weights or {})
        )
        unknown = sorted(set(weights) - set(self.datasets))
        if unknown:
            raise InputError(
                f"--dataset_weights: {', '.join(unknown)} is not a training dataset (have: {', '.join(self.datasets)})"
            )
        shares = np.array([weights.get(name, 1.0) for name in self.datasets], float)
        if shares.sum() <= 0:
            raise InputError("--dataset_weights: at least one dataset needs a weight above 0")
        # None keeps the equal-share draw of earlier runs, so their clips (and resumed runs) stay the same
        self.shares = shares / shares.sum() if weights else None
        self.num_frames, self.max_gap, self.max_objects = num_frames, max_gap, max_objects
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.transforms = transforms or clip_transforms(crop_size)
        self.storage_transforms = storage_transforms
        self.cache: dict[Path, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _read(self, path: Path, label: bool) -> np.ndarray:
        """Decode a frame (H×W×3 uint8) or label map (H×W uint8), through the cache if enabled."""
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        if label:
            array = read_label_map(path)
        else:
            array = read_rgb(path)
        if self.cache is not None:
            self.cache[path] = array
        return array

    def _frame_indices(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """Frame indices in order with gaps in [1, max_gap], reversed with p=0.5; short sequences repeat frames."""
        t = self.num_frames
        if length < t:
            indices = np.sort(rng.integers(0, length, t))
        else:
            max_gap = max(1, min(self.max_gap, (length - 1) // max(t - 1, 1)))
            gaps = rng.integers(1, max_gap + 1, t - 1)
            start = rng.integers(0, length - gaps.sum())
            indices = start + np.concatenate([[0], np.cumsum(gaps)])
        return indices[::-1].copy() if rng.random() < 0.5 else indices

    def _augment(
        self, image: torch.Tensor, label: torch.Tensor, objects: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Transform the stacked clip, retrying crops that lose objects in the first frame; drop those still lost.

        Labels stay unmapped until after the transforms so the first-frame check is a bincount on the small crop.
        """
        for _ in range(CROP_TRIES):
            out = self.transforms({"image": image, "label": label})
            out_label = convert_to_tensor(out["label"], track_meta=False).round().long()
            counts = torch.bincount(out_label[0].flatten(), minlength=256)
            present = [k for k in objects if counts[k] > 0]
            if len(present) == len(objects):
                break
        return convert_to_tensor(out["image"], track_meta=False), remap_objects(out_label, present), len(present)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        self.transforms.set_random_state(seed=int(rng.integers(2**31)))
        for _ in range(CLIP_TRIES):
            pick = (
                rng.integers(len(self.datasets))
                if self.shares is None
                else rng.choice(len(self.datasets), p=self.shares)
            )
            sequences = self.by_dataset[self.datasets[pick]]
            seq = sequences[rng.integers(len(sequences))]
            indices = self._frame_indices(rng, len(seq.frames))
            labels = np.stack([self._read(seq.masks[i], label=True) for i in indices])
            objects = np.flatnonzero(np.bincount(labels[0].ravel(), minlength=256)[1:]) + 1
            if not len(objects):
                continue
            frames = np.stack([self._read(seq.frames[i], label=False) for i in indices])
            if frames.shape[1:3] != labels.shape[1:]:
                raise InputError(
                    f"{seq.key}: frame size {frames.shape[1:3]} differs from label size {labels.shape[1:]}"
                )
            t, h, w, _ = frames.shape
            image = torch.from_numpy(frames).permute(0, 3, 1, 2).reshape(3 * t, h, w).float().div_(255)
            chosen = rng.permutation(objects)[: self.max_objects]
            image, label, num_objects = self._augment(image, torch.from_numpy(labels).float(), chosen)
            if num_objects:
                size = image.shape[-2:]
                image = image.reshape(t, 3, *size).clamp_(0, 1)
                return {
                    "image": store(self.storage_transforms, image, rng),
                    "label": label.reshape(t, 1, *size),
                    "frame_index": torch.as_tensor(indices, dtype=torch.int64),
                    "num_objects": num_objects,
                }
        raise RuntimeError(f"no clip with an annotated first frame found in {CLIP_TRIES} tries (item {index})")
