"""The evaluation suite's sets (``scripts.tools.suite``): which data each set is, and the generated ones made once.

Sets (``SETS``): ``cvc_val`` and ``vocalfolds_val`` (the ``val`` entries of ``--split_file``), ``davis_val`` (the
``val`` list of ``davis2016/meta.json``), ``kvasir_heldout`` and ``hc18_heldout`` (``scripts.tools.heldout_clips``
over the held-out stills, with its defaults), and ``<cvc_val|vocalfolds_val>@<storage>`` for each storage of
``STORAGE``: every val sequence encoded with PyAV (the real codecs) and decoded back to PNG frames (JPEG frames for
``jpeg30``, greyscale PNG for ``grey``), annotations copied. Generated sets are written once into the cache folder
under a digest of everything they depend on (sources, settings, format version), and reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from scripts.data import list_sequences
from scripts.errors import InputError
from scripts.staging import staged_output

CACHE_VERSION = 1  # bump when a generated set's content changes for the same settings


@dataclass(frozen=True)
class Storage:
    """How a stored-video set stores its frames: a video codec (encoded, then decoded to PNG) or an image format."""

    description: str
    codec: str | None = None  # PyAV encoder; None: frames stored as images
    container: str | None = None  # PyAV container format
    bits_per_pixel: float = 0.0  # bit rate as bits per pixel per frame (the codec's rate control target)
    jpeg_quality: int | None = None
    grey: bool = False


FPS = 25  # the frame rate the videos are encoded at: with the bit rate, it sets the bits each frame gets
STORAGE = {
    # 0.35 bit per pixel per frame: about what OpenCV's VideoWriter ('XVID', 'mp4v') writes (model card, Suite)
    "avi": Storage("MPEG-4 part 2 (mpeg4) in AVI, 0.35 bit/pixel/frame, GOP 12", "mpeg4", "avi", 0.35),
    # 0.1 bit per pixel per frame: 276 kbit/s at 384×288 and 655 kbit/s at 512×512, 25 frames/s (a low rate)
    "h264": Storage("H.264 (libx264) in MP4 at low bit rate, 0.1 bit/pixel/frame", "libx264", "mp4", 0.1),
    "jpeg30": Storage("JPEG series, quality 30 (4:2:0)", jpeg_quality=30),
    "grey": Storage("greyscale PNG series (ITU-R 601 luma)", grey=True),
}
HELDOUT_SETTINGS = {"clips": 60, "frames": 20, "size": 320, "max_objects": 2, "seed": 0}  # heldout_clips' defaults
VAL_SETS = {"cvc_val": "cvc_clinicdb", "vocalfolds_val": "vocalfolds"}  # set → data folder (val of --split_file)
DAVIS_SETS = {"davis_val": "davis2016"}  # val list of the folder's meta.json
HELDOUT_SETS = {"kvasir_heldout": "kvasir_seg", "hc18_heldout": "hc18"}  # image/mask folders
STORED_SETS = {f"{base}@{kind}": (base, kind) for base in VAL_SETS for kind in STORAGE}
SETS = (*VAL_SETS, *DAVIS_SETS, *HELDOUT_SETS, *STORED_SETS)
MEDICAL = ("cvc_val", "vocalfolds_val", "kvasir_heldout", "hc18_heldout")


def encode_decode(frames: Sequence[np.ndarray], storage: Storage) -> list[np.ndarray]:
    """Store RGB frames (H×W×3 uint8) with a real video codec in memory and decode them back.

    Odd sides are padded by repeating the edge for 4:2:0 chroma, and cropped back after decoding.
    """
    height, width = frames[0].shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=storage.container) as container:
        stream = container.add_stream(storage.codec, rate=FPS)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = max(1, round(storage.bits_per_pixel * stream.width * stream.height * FPS))
        if storage.codec == "mpeg4":
            stream.codec_context.gop_size = 12  # OpenCV's and FFmpeg's default for MPEG-4 part 2
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.pad(frame, pad, mode="edge")), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer, "r") as container:
        decoded = [f.to_ndarray(format="rgb24")[:height, :width] for f in container.decode(video=0)]
    if len(decoded) != len(frames):
        raise RuntimeError(f"{storage.codec}: {len(frames)} frames encoded, {len(decoded)} decoded")
    return decoded


def write_stored_set(source_root: Path, names: Sequence[str], kind: str, target: Path, overwrite: bool = False) -> dict:
    """Write sequences ``names`` of the DAVIS root ``source_root`` stored as ``STORAGE[kind]`` into ``target`` (DAVIS
    layout, annotations copied, a ``meta.json``); nothing is written unless all of it is. Returns the meta data,
    which records how far the stored frames are from the originals (mean absolute difference in grey levels)."""
    storage = STORAGE[kind]
    sequences = {s.name: s for s in list_sequences(source_root)}
    differences = {}
    with staged_output(target, ("JPEGImages", "Annotations", "meta.json"), overwrite) as staging:
        for name in names:
            seq = sequences[name]
            frames = [_read_rgb(path) for path in seq.frames]
            if storage.codec:
                stored = encode_decode(frames, storage)
                images = [Image.fromarray(f) for f in stored]
                suffix, options = ".png", {}
            elif storage.grey:
                images = [Image.fromarray(f).convert("L") for f in frames]
                suffix, options = ".png", {}
            else:
                images = [Image.fromarray(f) for f in frames]
                suffix, options = ".jpg", {"quality": storage.jpeg_quality}
            (staging / "JPEGImages" / name).mkdir(parents=True)
            (staging / "Annotations" / name).mkdir(parents=True)
            errors = []
            for frame, image, source_path, mask in zip(frames, images, seq.frames, seq.masks):
                path = staging / "JPEGImages" / name / f"{source_path.stem}{suffix}"
                image.save(path, **options)
                errors.append(float(np.abs(_read_rgb(path).astype(np.int16) - frame).mean()))
                shutil.copyfile(mask, staging / "Annotations" / name / mask.name)
            differences[name] = float(np.mean(errors))
        meta = {
            "dataset": target.name,
            "source": str(source_root),
            "storage": kind,
            "description": storage.description,
            "frames_per_second": FPS if storage.codec else None,
            "mean_abs_difference": differences,  # per sequence, grey levels (0-255) over pixels and channels
            "classes": _classes(source_root),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _classes(root: Path) -> dict:
    try:
        return json.loads((root / "meta.json").read_text()).get("classes", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


# --------------------------------------------------------------------------------------------------------------- sets
@dataclass
class SuiteSet:
    """One set ready to evaluate: its DAVIS root and the sequences of that root it scores."""

    name: str
    root: Path
    sequences: list[str]
    medical: bool
    lossless: str | None = None  # for a stored set: the set it is the stored copy of


def _digest(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _cached(cache_dir: Path, name: str, settings: Mapping) -> tuple[Path, bool]:
    """The cache folder of a generated set (under a digest of its settings) and whether it is complete.
    ``meta.json`` moves in last (``staged_output`` moves in the order named), so it marks a complete copy."""
    target = cache_dir / _digest({**settings, "set": name, "version": CACHE_VERSION}) / name
    return target, (target / "meta.json").is_file()


def val_sequences(root: Path, split_file: Path) -> list[str]:
    return [s.name for s in list_sequences(root, "val", split_file)]


def davis_val_sequences(root: Path) -> list[str]:
    """DAVIS 2016 val from the folder's own ``meta.json`` (``splits.val``), whatever the split file says."""
    try:
        names = json.loads((root / "meta.json").read_text())["splits"]["val"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{root / 'meta.json'}: no list of val sequences under 'splits' ({err})") from err
    present = {s.name for s in list_sequences(root)}
    missing = [n for n in names if n not in present]
    if missing:
        raise InputError(f"{root}: val sequences {missing} of its meta.json are missing")
    return list(names)


def prepare_sets(names: Sequence[str], data_root: Path, cache_dir: Path, split_file: Path) -> tuple[list, dict]:
    """The sets to evaluate (generated ones made or found in the cache) and the reasons others were skipped."""
    ready: dict[str, SuiteSet] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name in VAL_SETS or name in DAVIS_SETS:
            root = data_root / {**VAL_SETS, **DAVIS_SETS}[name]
            if not (root / "JPEGImages").is_dir():
                skipped[name] = f"{root}: no DAVIS-layout data there"
                continue
            sequences = val_sequences(root, split_file) if name in VAL_SETS else davis_val_sequences(root)
            if not sequences:
                skipped[name] = f"{root}: no val sequence in {split_file}"
                continue
            ready[name] = SuiteSet(name, root, sequences, name in MEDICAL)
        elif name in HELDOUT_SETS:
            source = data_root / HELDOUT_SETS[name]
            if not (source / "images").is_dir():
                skipped[name] = f"{source}: no image/mask folder there"
                continue
            from scripts.tools.heldout_clips import write_heldout_clips  # MONAI transforms: only when needed

            stills = sorted(p.name for p in (source / "images").iterdir())
            settings = {"source": str(source.resolve()), "stills": stills, **HELDOUT_SETTINGS}
            target, complete = _cached(cache_dir, name, settings)
            if not complete:
                print(f"{name}: writing {HELDOUT_SETTINGS['clips']} clips from the held-out fifth of {source}")
                write_heldout_clips(str(source), target, **HELDOUT_SETTINGS, overwrite=True)
            clips = [s.name for s in list_sequences(target)]
            ready[name] = SuiteSet(name, target, clips, True)
        else:
            base, kind = STORED_SETS[name]
            if base not in ready:
                skipped[name] = f"its lossless set {base} is skipped"
                continue
            lossless = ready[base]
            frames = {
                n: sorted(p.name for p in (lossless.root / "JPEGImages" / n).iterdir()) for n in lossless.sequences
            }
            settings = {"source": str(lossless.root.resolve()), "frames": frames, "storage": STORAGE[kind].__dict__}
            target, complete = _cached(cache_dir, name, {**settings, "fps": FPS})
            if not complete:
                print(f"{name}: storing {len(lossless.sequences)} sequences of {lossless.root} as {kind}")
                write_stored_set(lossless.root, lossless.sequences, kind, target, overwrite=True)
            ready[name] = SuiteSet(name, target, list(lossless.sequences), False, base)
    return list(ready.values()), skipped
