"""Write results: output folders staged so a failed run leaves nothing behind, NIfTI series and PNG label maps.

Series are written ``W×H×1×T`` with the input's affine and ``pixdim[4] = 1 / fps`` (the axis convention of
``scripts.readers``), so they read back exactly. Every output goes through ``staged_output``, so a failed run leaves
no partial results and never touches what was there before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from numpy.lib import recfunctions
from PIL import Image

from scripts.errors import InputError
from scripts.readers import NIFTI_SUFFIXES, RGB24, VideoInfo, path_suffix


def prepare_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Check that ``path`` may receive results (absent, empty, or ``overwrite``); creates nothing."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: output path exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"{path}: output directory already holds results; choose another or pass overwrite=True")
    return path


@contextmanager
def staged_output(final_path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final_path`` to write into; it replaces ``final_path`` only on success.

    On an exception the temporary directory is deleted and an existing ``final_path`` is left untouched.
    """
    final = prepare_output_dir(final_path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.is_dir() and any(final.iterdir()):
        previous = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        final.replace(previous / final.name)
        try:
            staging.replace(final)
        except OSError:
            (previous / final.name).replace(final)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(previous)
    else:
        staging.replace(final)  # atomic; also replaces an empty directory


def _series_image(frames: np.ndarray, affine: np.ndarray, fps: float | None) -> nib.Nifti1Image:
    """``T×H×W`` (or ``T×H×W×3`` uint8) frames as a ``W×H×1×T`` NIfTI view, without copying a memmap."""
    if frames.ndim == 4:
        frames = recfunctions.unstructured_to_structured(np.ascontiguousarray(frames, np.uint8), dtype=RGB24)
    image = nib.Nifti1Image(frames.transpose(2, 1, 0)[:, :, None, :], np.asarray(affine, dtype=float))
    image.header.set_xyzt_units("mm", "sec" if fps else "unknown")
    image.header.set_zooms(image.header.get_zooms()[:3] + (1.0 / fps if fps else 1.0,))
    return image


def write_nifti_series(
    path: str | Path, frames: np.ndarray, affine: np.ndarray | None = None, fps: float | None = None
) -> Path:
    """Write ``T×H×W`` grey or ``T×H×W×3`` RGB frames as a NIfTI 2D+t series (the module's axis convention)."""
    nib.save(_series_image(np.asarray(frames), np.eye(4) if affine is None else affine, fps), str(path))
    return Path(path)


class LabelSeriesWriter:
    """Label maps of every frame -> one uint8 NIfTI series with the input's affine and fps.

    Frames are staged in a ``np.memmap`` next to the output, so a long series is never held in RAM. Use as a
    context manager (an exception discards the series) or call ``close()`` after the last ``write``.
    """

    def __init__(self, path: str | Path, info: VideoInfo) -> None:
        self.path, self.info = Path(path), info
        if path_suffix(self.path) not in NIFTI_SUFFIXES:
            raise ValueError(f"{self.path}: a label series is written as .nii or .nii.gz")
        handle, self.buffer = tempfile.mkstemp(prefix=".", suffix=".labels", dir=self.path.parent)
        os.close(handle)
        self.labels = np.memmap(self.buffer, np.uint8, "w+", shape=(info.num_frames, info.height, info.width))
        self.written = np.zeros(info.num_frames, bool)

    def write(self, t: int, labels: np.ndarray) -> None:
        if not 0 <= t < len(self.written):
            raise IndexError(f"{self.path}: frame {t} is outside 0..{len(self.written) - 1}")
        if labels.shape != self.labels.shape[1:]:
            raise ValueError(f"{self.path}: frame {t} labels are {labels.shape}, expected {self.labels.shape[1:]}")
        self.labels[t] = labels
        self.written[t] = True

    def close(self) -> None:
        if self.labels is None:
            return
        try:
            missing = np.flatnonzero(~self.written)
            if missing.size:
                raise ValueError(f"{self.path}: {missing.size} frames were never written, e.g. {missing[:5].tolist()}")
            image = _series_image(self.labels, self.info.affine, self.info.fps)
            image.header.set_intent("label")
            nib.save(image, str(self.path))
        finally:
            self._discard()

    def _discard(self) -> None:
        self.labels = None
        os.unlink(self.buffer)

    def __enter__(self) -> LabelSeriesWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self.labels is not None:
            self._discard()


def write_png_labels(directory: str | Path, t: int, labels: np.ndarray) -> Path:
    """Write one label map as ``directory/NNNNN.png`` (8-bit greyscale, DAVIS naming)."""
    path = Path(directory) / f"{t:05d}.png"
    Image.fromarray(np.asarray(labels, np.uint8), mode="L").save(path)
    return path
