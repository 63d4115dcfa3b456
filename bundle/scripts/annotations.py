"""Read label maps and check annotated frames against their video.

One reader, ``read_label_map``, decodes every label image (annotations, training and validation masks), so a
mask means the same objects wherever it is used. A label map is ``H×W`` ``uint8``: 0 background, 1..``MAX_LABEL``
objects. Every bad mask raises ``InputError`` naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from scripts.errors import InputError
from scripts.overlay import PALETTE
from scripts.readers import READ_ERRORS, NiftiSeries, VideoInfo, natural_key, path_suffix

MAX_LABEL = 255


# The one table of annotation formats: suffix → how it is read (a PNG label map of one frame; a NIfTI label map or
# label series). Every job and the app ask `annotation_kind` / `check_annotation_format`.
ANNOTATION_FORMATS = {".png": "png", ".nii": "nifti", ".nii.gz": "nifti"}


def annotation_kind(path: str | Path) -> str | None:
    """`png` or `nifti` from the format table, None for any other file."""
    return ANNOTATION_FORMATS.get(path_suffix(Path(path)))


def check_annotation_format(path: str | Path, shown: str | None = None) -> str:
    """The annotation's kind, or a one-line `InputError` naming `shown` (default: the path) and the formats taken."""
    kind = annotation_kind(path)
    if kind is None:
        *first, last = ANNOTATION_FORMATS
        suffix = path_suffix(Path(path))
        raise InputError(f"{shown or path}: unsupported annotation format {suffix!r}; use {', '.join(first)} or {last}")
    return kind


def read_label_map(path: str | Path) -> np.ndarray:
    """``H×W`` uint8 label map of a label image: the one rule for annotations, training and validation masks.

    L/P/16-bit PNGs give their values (palette index for P); colour PNGs are mapped through the DAVIS palette. Values
    outside 0..``MAX_LABEL`` raise ``InputError`` naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            values = np.asarray(image)
    except READ_ERRORS as err:
        raise InputError(f"{path}: unreadable label image ({err})") from err
    if values.ndim == 3:
        rgb = values[..., :3]
        if not (rgb.shape[-1] < 3 or (rgb == rgb[..., :1]).all()):
            return _palette_labels(path, rgb)
        values = rgb[..., 0]
    if values.min() < 0 or values.max() > MAX_LABEL:
        raise InputError(f"{path}: label values must lie in 0..{MAX_LABEL}, found {values.min()}..{values.max()}")
    return values.astype(np.uint8)


def _palette_labels(path: Path, rgb: np.ndarray) -> np.ndarray:
    """Label of each pixel of a colour mask: the index of its colour in the DAVIS palette."""
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    codes = {tuple(c): k for k, c in enumerate(PALETTE.tolist())}
    if any(tuple(c) not in codes for c in colours.tolist()):
        raise InputError(
            f"{path}: colour mask with colours outside the DAVIS palette; save label maps as "
            "greyscale (L) or palette (P) PNGs holding the object numbers"
        )
    return np.asarray([codes[tuple(c)] for c in colours.tolist()], np.uint8)[inverse.ravel()].reshape(rgb.shape[:2])


def _label_map(path: Path, values: np.ndarray, info: VideoInfo) -> np.ndarray:
    """Validate one label map against the video: size, integer labels in range, some foreground."""
    if values.shape != (info.height, info.width):
        raise InputError(
            f"{path}: mask is {'×'.join(map(str, values.shape))} (H×W) but the frames of {info.path} "
            f"are {info.height}×{info.width}"
        )
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise InputError(f"{path}: label values must be integers, found {values[bad].flat[0]}")
    if values.min() < 0 or values.max() > MAX_LABEL:
        raise InputError(f"{path}: label values must lie in 0..{MAX_LABEL}, found {values.min()}..{values.max()}")
    if not values.any():
        raise InputError(f"{path}: mask has no foreground pixel (all labels are 0)")
    return values.astype(np.uint8)


def read_annotations(
    paths: Sequence[str | Path], frames: Sequence[int] | None, info: VideoInfo
) -> dict[int, np.ndarray]:
    """Annotated frame index -> validated ``H×W`` uint8 label map.

    Each path is a PNG or NIfTI label map of the frame ``frames[i]`` (default 0), or a NIfTI series with as many
    frames as the video, whose frames with foreground are the annotated ones (its ``frames`` entry is ignored).
    """
    if not paths:
        raise InputError(f"{info.path}: no annotation given")
    if frames is not None and len(frames) != len(paths):
        raise InputError(f"{paths[0]}: {len(paths)} annotation files but {len(frames)} annotated frame indices")
    annotations: dict[int, np.ndarray] = {}
    for i, path in enumerate(map(Path, paths)):
        if not path.is_file():
            raise InputError(f"{path}: no such annotation file")
        if check_annotation_format(path) == "nifti":
            found = _read_nifti_annotations(path, info, frames[i] if frames is not None else 0)
        else:
            t = frames[i] if frames is not None else 0
            found = {_frame_index(path, t, info): _label_map(path, read_label_map(path), info)}
        for t, labels in found.items():
            if t in annotations:
                raise InputError(f"{path}: frame {t} is annotated twice")
            annotations[t] = labels
    return annotations


def _frame_index(path: Path, t: int, info: VideoInfo) -> int:
    if not 0 <= t < info.num_frames:
        raise InputError(
            f"{path}: annotated frame {t} is out of range, {info.path} has frames 0..{info.num_frames - 1}"
        )
    return int(t)


def _read_nifti_annotations(path: Path, info: VideoInfo, t: int) -> dict[int, np.ndarray]:
    series = NiftiSeries(path)
    if series.is_rgb:
        raise InputError(f"{path}: label map must have one channel, found RGB")
    if series.num_frames == 1:
        return {_frame_index(path, t, info): _label_map(path, series.block(0, 1)[0], info)}
    if series.num_frames != info.num_frames:
        raise InputError(f"{path}: label series has {series.num_frames} frames but {info.path} has {info.num_frames}")
    found = {}
    for t0 in range(0, series.num_frames, series.block_frames):
        for t, values in enumerate(series.block(t0, t0 + series.block_frames), start=t0):
            if values.any():
                found[t] = _label_map(path, values, info)
    if not found:
        raise InputError(f"{path}: mask has no foreground pixel in any frame")
    return found


def read_label_series(path: str | Path) -> np.ndarray:
    """``T×H×W`` labels from a NIfTI series or a folder of PNG label maps (for round trips and evaluation)."""
    path = Path(path)
    if path.is_dir():
        return np.stack([read_label_map(p) for p in sorted(path.glob("*.png"), key=natural_key)])
    series = NiftiSeries(path)
    return series.block(0, series.num_frames)
