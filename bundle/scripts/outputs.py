"""Write results: NIfTI label series and PNG label maps (staged by ``scripts.staging``).

A NIfTI input's label series is written in its own layout (``VideoInfo.layout``: shape, qform/sform, pixdims, units)
so it overlays on the input in a viewer; other inputs' as ``W×H×1×T`` with their affine and ``pixdim[4] = 1 / fps``
(the axis convention of ``scripts.readers``). Either way they read back exactly.
"""

from __future__ import annotations

import errno
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from numpy.lib import recfunctions
from PIL import Image

from scripts.readers import NIFTI_SUFFIXES, RGB24, NiftiLayout, VideoInfo, path_suffix


def _series_image(
    frames: np.ndarray, affine: np.ndarray, fps: float | None, layout: NiftiLayout | None = None
) -> nib.Nifti1Image:
    """``T×H×W`` (or ``T×H×W×3`` uint8) frames as a NIfTI view, without copying a memmap.

    With a ``layout`` (a NIfTI input's) the image takes its shape, pixdims, units and qform/sform with their codes,
    so it overlays on that input in a viewer; ``affine`` and ``fps`` then agree with it already. Without one it is
    ``W×H×1×T`` with ``affine`` and ``pixdim[4] = 1 / fps`` seconds.
    """
    if frames.ndim == 4:
        frames = recfunctions.unstructured_to_structured(np.ascontiguousarray(frames, np.uint8), dtype=RGB24)
    if layout is None:
        image = nib.Nifti1Image(frames.transpose(2, 1, 0)[:, :, None, :], np.asarray(affine, dtype=float))
        image.header.set_xyzt_units("mm", "sec" if fps else "unknown")
        image.header.set_zooms(image.header.get_zooms()[:3] + (1.0 / fps if fps else 1.0,))
        return image
    image = nib.Nifti1Image(frames.transpose(2, 1, 0).reshape(layout.shape), None)  # adds unit axes: still a view
    header = image.header
    header.set_qform(layout.qform, layout.qform_code)  # also sets pixdim[1:4] from the matrix: zooms come after
    header.set_sform(layout.sform, layout.sform_code)
    header["pixdim"][1 : len(layout.zooms) + 1] = layout.zooms  # all of the input's, unvalidated like its own
    header.set_xyzt_units(*layout.units)
    return image


def _write_at(handle: int, data: bytes, offset: int) -> None:
    """``pwrite`` until all of ``data`` is written (a write may be cut short, e.g. at a file-size limit)."""
    view = memoryview(data)
    while view:
        count = os.pwrite(handle, view, offset)
        view, offset = view[count:], offset + count


def _allocate(handle: int, size: int) -> None:
    """Give a file ``size`` bytes of real disk space, failing now (ENOSPC, EFBIG) rather than on a later write."""
    try:
        os.posix_fallocate(handle, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        zeros = bytes(min(size, 1 << 20))  # a filesystem without fallocate: write the zeros
        for offset in range(0, size, len(zeros)):
            _write_at(handle, zeros[: size - offset], offset)


def allocated_memmap(path: str | Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 ``np.memmap`` file of ``shape`` whose disk space is allocated up front, so writing through it can
    never fault on a full disk (a sparse memmap kills the process with SIGBUS there); a full disk raises here."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _allocate(handle, int(np.prod(shape)))
    except OSError:
        os.close(handle)
        os.unlink(path)
        raise
    os.close(handle)
    return np.memmap(path, np.uint8, "r+", shape=shape)


class LabelFrames:
    """The frames a `LabelSeriesWriter` holds, read back one at a time: ``frames[t]`` is an H×W uint8 label map;
    ``np.asarray(frames)`` gives all of them as ``T×H×W`` (for the DICOM SEG, which highdicom builds whole)."""

    def __init__(self, writer: LabelSeriesWriter) -> None:
        self._writer = writer
        self.shape = (len(writer.written), writer.info.height, writer.info.width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, t: int) -> np.ndarray:
        return self._writer.frame(int(t))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        frames = np.stack([self._writer.frame(t) for t in range(len(self))]) if len(self) else np.zeros(self.shape)
        return frames.astype(dtype or np.uint8, copy=False)


class LabelSeriesWriter:
    """Label maps of every frame -> one uint8 NIfTI series with the input's affine and fps.

    Frames arrive in propagation order (forward from the annotated frame, then backward) while the NIfTI stores them
    in frame order, so they wait in a buffer file next to the output, each zlib-compressed (level 1): label maps
    compress well, so the run needs about the space of its outputs rather than a raw ``T×H×W`` buffer, and a long
    series is never held in RAM. The buffer grows by ordinary writes, so a full disk or a file-size limit raises
    ``OSError`` (naming the series) instead of killing the process with SIGBUS, as a write through a sparse memmap
    would. ``labels`` reads frames back (`LabelFrames`); `close` streams the NIfTI frame by frame, its header made by
    nibabel. Use as a context manager (an exception discards the series) or call ``close()`` after the last ``write``.
    """

    def __init__(self, path: str | Path, info: VideoInfo) -> None:
        self.path, self.info = Path(path), info
        if path_suffix(self.path) not in NIFTI_SUFFIXES:
            raise ValueError(f"{self.path}: a label series is written as .nii or .nii.gz")
        self._handle, self.buffer = tempfile.mkstemp(prefix=".", suffix=".labels", dir=self.path.parent)
        self._chunks: dict[int, tuple[int, int]] = {}  # frame → (offset, size) of its compressed bytes in the buffer
        self._end = 0
        self.written = np.zeros(info.num_frames, bool)
        self.labels: LabelFrames | None = LabelFrames(self)

    def write(self, t: int, labels: np.ndarray) -> None:
        if not 0 <= t < len(self.written):
            raise IndexError(f"{self.path}: frame {t} is outside 0..{len(self.written) - 1}")
        if labels.shape != (self.info.height, self.info.width):
            raise ValueError(
                f"{self.path}: frame {t} labels are {labels.shape}, expected {(self.info.height, self.info.width)}"
            )
        data = zlib.compress(np.ascontiguousarray(labels, np.uint8).tobytes(), 1)
        try:
            _write_at(self._handle, data, self._end)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._chunks[t] = (self._end, len(data))
        self._end += len(data)
        self.written[t] = True

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t``'s labels (H×W uint8), read back from the buffer."""
        if not self.written[t]:
            raise IndexError(f"{self.path}: frame {t} was not written")
        offset, size = self._chunks[t]
        data = zlib.decompress(os.pread(self._handle, size, offset))
        return np.frombuffer(data, np.uint8).reshape(self.info.height, self.info.width)

    def close(self) -> None:
        if self.labels is None:
            return
        try:
            missing = np.flatnonzero(~self.written)
            if missing.size:
                raise ValueError(f"{self.path}: {missing.size} frames were never written, e.g. {missing[:5].tolist()}")
            self._save()
        finally:
            self._discard()

    def _save(self) -> None:
        """The NIfTI: nibabel's header (of a zero-stride stand-in for the data, which it never reads), then the
        frames in order: in every layout the NIfTI's data (x fastest, then y, then frame) is each frame's H×W map
        in C order, one frame after the other. nibabel cannot take the data a frame at a time."""
        shape = (self.info.num_frames, self.info.height, self.info.width)
        image = _series_image(np.broadcast_to(np.uint8(0), shape), self.info.affine, self.info.fps, self.info.layout)
        image.header.set_intent("label")
        image.update_header()
        image.header.set_slope_inter(1.0, 0.0)  # what nib.save writes for unscaled uint8
        try:
            with ImageOpener(str(self.path), "wb") as f:
                image.header.write_to(f)
                f.write(b"\0" * (int(image.header.get_data_offset()) - f.tell()))
                for t in range(self.info.num_frames):
                    f.write(self.frame(t).tobytes())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def _discard(self) -> None:
        self.labels = None
        os.close(self._handle)
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
