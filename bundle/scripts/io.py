"""Read videos and series lazily, read and validate annotations, write label maps and overlays.

Conventions (shared with every module, see ``docs/interfaces.md``):

- A frame is ``H×W×3`` ``uint8`` RGB (grey inputs are repeated to 3 channels); a label map is ``H×W`` ``uint8``
  (0 background, 1..``MAX_LABEL`` objects).
- NIfTI axis order: voxel index ``(i, j)`` is (column x, row y), as in ITK and MONAI, so
  ``frame[row, col] = data[col, row, t]`` (a frame is ``data[:, :, t].T``) and the affine maps ``(col, row, 0)`` to
  world coordinates. Accepted 2D+t layouts: ``W×H×T``, ``W×H×1×T``, ``W×H×T×1``, RGB as ``W×H×T×3`` or the RGB24
  dtype; series are written as ``W×H×1×T`` with ``pixdim[4] = 1 / fps`` seconds, so a file written here reads back
  to exactly the same frames, affine, spacing and fps.
- ``VideoInfo.spacing`` is the pixel spacing in (x, y) = (column, row) order, as MONAI's ``pixdim``; ``affine`` is
  identity with unit spacing for frame folders and video files.
- MP4/AVI are lossy: a clip written by ``write_video`` reads back within ``VIDEO_ROUND_TRIP_MAE`` (mean absolute
  error in grey levels) on smooth content. NIfTI, DICOM and PNG round trips are exact.
- Every bad input raises ``InputError`` naming the file and the problem. Outputs go through ``staged_output`` so a
  failed run leaves no partial results and never touches what was there before.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np
from monai.data import ITKReader
from monai.utils import optional_import
from numpy.lib import recfunctions
from PIL import GifImagePlugin, Image

# PyAV (video) is a dependency, but imported lazily: training and evaluation on frame folders never need it, so a
# GPU host without its wheel still runs them; opening a video there fails with MONAI's OptionalImportError naming it.
av, _ = optional_import("av")

MAX_LABEL = 255
VIDEO_ROUND_TRIP_MAE = 6.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VIDEO_SUFFIXES = (".mp4", ".avi")
CACHE_BYTES = 64 * 2**20  # decoded frames kept for random access (video GOPs, NIfTI blocks)
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, RuntimeError)


class InputError(ValueError):
    """A user-supplied file or directory cannot be used; the message names it and says why."""


@dataclass
class VideoInfo:
    """What every consumer needs to know about a video without reading its frames."""

    path: str
    kind: str  # frames|nifti|video|dicom|synthetic
    num_frames: int
    height: int
    width: int
    affine: np.ndarray  # 4×4, index (col, row, frame) -> world
    spacing: tuple[float, ...]  # (x, y) pixel spacing
    fps: float | None = None


def pixel_info(path: str, kind: str, num_frames: int, height: int, width: int, fps: float | None) -> VideoInfo:
    """Geometry of sources without one (frames, video, synthetic): identity affine, unit pixel spacing."""
    return VideoInfo(path, kind, num_frames, height, width, np.eye(4), (1.0, 1.0), fps)


class VideoSource:
    """A video as a lazy sequence of ``H×W×3`` uint8 RGB frames; subclasses implement ``_read``."""

    info: VideoInfo

    def __len__(self) -> int:
        return self.info.num_frames

    def __getitem__(self, t: int) -> np.ndarray:
        if not 0 <= t < len(self):
            raise IndexError(f"{self.info.path}: frame {t} is outside 0..{len(self) - 1}")
        return self._read(int(t))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[t] for t in range(len(self)))

    def _read(self, t: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (only video files hold one)."""

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def _natural_key(path: Path) -> list:
    """Sort ``2.png`` before ``10.png`` as well as zero-padded DAVIS names."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _rgb(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=-1))


def _window(sample: np.ndarray) -> tuple[float, float]:
    """Robust intensity window (0.5-99.5 percentiles) for mapping non-uint8 data to uint8."""
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _to_uint8(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is None:
        return values
    lo, hi = window
    scaled = (np.nan_to_num(values.astype(np.float32), nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


class FrameFolderSource(VideoSource):
    """A folder of frame images in name order (works on DAVIS ``JPEGImages/<seq>/``)."""

    def __init__(self, path: Path) -> None:
        self.files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not self.files:
            raise InputError(f"{path}: zero frames, the folder holds no {'/'.join(IMAGE_SUFFIXES)} image")
        sizes = [self._size(f) for f in self.files]  # headers only: catches unreadable and odd-sized frames early
        for f, size in zip(self.files, sizes):
            if size != sizes[0]:
                raise InputError(
                    f"{f}: frame is {size[1]}×{size[0]} (H×W) but {self.files[0].name} is "
                    f"{sizes[0][1]}×{sizes[0][0]}"
                )
        self.info = pixel_info(str(path), "frames", len(self.files), sizes[0][1], sizes[0][0], None)

    @staticmethod
    def _size(file: Path) -> tuple[int, int]:
        try:
            with Image.open(file) as image:
                return image.size
        except _READ_ERRORS as err:
            raise InputError(f"{file}: unreadable image ({err})") from err

    def _read(self, t: int) -> np.ndarray:
        try:
            with Image.open(self.files[t]) as image:
                return np.asarray(image.convert("RGB"))
        except _READ_ERRORS as err:
            raise InputError(f"{self.files[t]}: unreadable image ({err})") from err


class _NiftiSeries:
    """Lazy 2D+t view of a NIfTI file: ``block(t0, t1)`` gives ``n×H×W`` (or ``n×H×W×3``) in file values.

    nibabel's ``dataobj`` proxy is used directly because MONAI's ``NibabelReader`` loads the whole array.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # keep .nii.gz open so reading blocks in order decompresses the file once, not once per block
            self.image = nib.load(str(path), keep_file_open=_suffix(path) == ".nii.gz")
        except Exception as err:  # nibabel raises many types for non-NIfTI bytes
            raise InputError(f"{path}: unreadable NIfTI file ({err})") from err
        self.rgb_dtype = self.image.get_data_dtype().names is not None
        shape = tuple(self.image.shape)
        while len(shape) > 4 and shape[-1] == 1:
            shape = shape[:-1]
        self.time_is_dim4 = len(shape) == 4 and shape[2] == 1
        self.channels = False
        if len(shape) == 2:
            shape = (*shape, 1)
        elif len(shape) == 4 and (shape[2] == 1 or shape[3] == 1):
            shape = (shape[0], shape[1], shape[2] * shape[3])
        elif len(shape) == 4 and shape[3] == 3 and not self.rgb_dtype:
            self.channels = True
        elif len(shape) != 3:
            raise InputError(
                f"{path}: array of shape {tuple(self.image.shape)} is not a 2D+t series; expected "
                "W×H×T, W×H×1×T or RGB W×H×T×3 (axes x, y, time)"
            )
        self.proxy = self.image.dataobj.reshape(shape)
        self.width, self.height, self.num_frames = shape[:3]
        self.is_rgb = self.rgb_dtype or self.channels
        unscaled = self.image.dataobj.slope == 1 and self.image.dataobj.inter == 0
        self.exact = unscaled and (self.rgb_dtype or self.image.get_data_dtype() == np.uint8)
        frame_bytes = self.width * self.height * (3 if self.is_rgb else 1) * self.image.get_data_dtype().itemsize
        self.block_frames = max(1, CACHE_BYTES // frame_bytes)

    def block(self, t0: int, t1: int) -> np.ndarray:
        try:
            values = np.asanyarray(self.proxy[:, :, t0:t1])
        except _READ_ERRORS as err:
            raise InputError(
                f"{self.path}: cannot read frames {t0}..{t1 - 1}, the file is truncated or corrupt ({err})"
            ) from err
        if self.rgb_dtype:
            values = recfunctions.structured_to_unstructured(values)
        return np.ascontiguousarray(np.moveaxis(values, 2, 0).swapaxes(1, 2))

    def fps(self) -> float | None:
        """Frame rate from ``pixdim[4]`` when time is the 4th NIfTI dimension with a time unit."""
        seconds = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(self.image.header.get_xyzt_units()[1])
        if not self.time_is_dim4 or seconds is None or self.image.header.get_zooms()[3] <= 0:
            return None
        return round(1.0 / (float(self.image.header.get_zooms()[3]) * seconds), 4)  # pixdim is float32


class NiftiSource(VideoSource):
    """A NIfTI 2D+t series read block by block (non-uint8 intensities are windowed to uint8)."""

    def __init__(self, path: Path) -> None:
        self.series = s = _NiftiSeries(path)
        zooms = s.image.header.get_zooms()
        spacing = (float(zooms[0]), float(zooms[1]))
        self.info = VideoInfo(str(path), "nifti", s.num_frames, s.height, s.width, s.image.affine, spacing, s.fps())
        self.window = None
        if not s.exact:  # percentiles of a strided subsample, so opening stays lazy
            frames = np.unique(np.linspace(0, s.num_frames - 1, min(s.num_frames, 8)).round().astype(int))
            self.window = _window(np.concatenate([s.block(t, t + 1)[:, ::4, ::4].ravel() for t in frames]))
        self._block: tuple[int, np.ndarray | None] = (-1, None)

    def _read(self, t: int) -> np.ndarray:
        b, size = t // self.series.block_frames, self.series.block_frames
        if self._block[0] != b:
            self._block = (b, _to_uint8(self.series.block(b * size, min((b + 1) * size, len(self))), self.window))
        return _rgb(self._block[1][t - b * size])


class DicomSource(VideoSource):
    """A DICOM cine (one multi-frame file, or a folder holding one series), read whole by MONAI's ``ITKReader``:
    ITK has no frame-by-frame reader, and cine clips are small."""

    def __init__(self, path: Path) -> None:
        reader = ITKReader(affine_lps_to_ras=True)
        try:
            data, meta = reader.get_data(reader.read(str(path)))
        except _READ_ERRORS as err:
            raise InputError(f"{path}: unreadable DICOM ({err})") from err
        data = np.asarray(data)
        rgb = meta.get("0028|0002", "1").strip() == "3" or (data.ndim == 4 and data.shape[-1] == 3)
        if data.ndim == 2 + rgb:  # a single frame
            data = data[:, :, None]
        if data.ndim != 3 + rgb:
            raise InputError(f"{path}: DICOM array of shape {data.shape} is not a 2D+t cine")
        frames = np.moveaxis(data, 2, 0).swapaxes(1, 2)  # (x, y, t) -> t×H×W, the NIfTI convention
        window = None if frames.dtype == np.uint8 else _window(frames[:, ::4, ::4])
        self.frames = np.ascontiguousarray(_to_uint8(frames, window))
        if len(self.frames) == 0:
            raise InputError(f"{path}: zero frames")
        spacing = tuple(float(s) for s in np.asarray(meta.get("spacing", (1.0, 1.0)), dtype=float)[:2])
        affine = np.asarray(meta["affine"], dtype=float)
        height, width = self.frames.shape[1:3]
        self.info = VideoInfo(str(path), "dicom", len(self.frames), height, width, affine, spacing, _dicom_fps(meta))

    def _read(self, t: int) -> np.ndarray:
        return _rgb(self.frames[t])


def _dicom_fps(meta: dict) -> float | None:
    """Frame rate from Frame Time (0018,1063, ms) or Cine Rate (0018,0040)."""
    for key, to_fps in (("0018|1063", lambda v: 1000.0 / v), ("0018|0040", float)):
        try:
            value = float(str(meta[key]).strip())
        except (KeyError, ValueError):
            continue
        if value > 0:
            return to_fps(value)
    return None


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise InputError(f"{path}: unreadable video, not a valid MP4/AVI or truncated ({err})") from err


class VideoFileSource(VideoSource):
    """An MP4/AVI file decoded with PyAV: sequential iteration streams; random access seeks to the keyframe before
    the frame and caches the decoded frames, so backward passes do not decode from the start each time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        pts, keys = [], []
        with _open_container(path) as container:
            if not container.streams.video:
                raise InputError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            try:  # demux only (no decoding) to index frames and detect truncation
                for packet in container.demux(stream):
                    if packet.size:
                        pts.append(packet.pts)
                        keys.append(packet.is_keyframe)
            except av.FFmpegError as err:
                raise InputError(f"{path}: video is truncated or corrupt after {len(pts)} frames ({err})") from err
            if stream.frames > len(pts):
                raise InputError(
                    f"{path}: video is truncated, its header declares {stream.frames} frames but only "
                    f"{len(pts)} are present"
                )
            if not pts:
                raise InputError(f"{path}: zero frames")
            if None in pts:
                raise InputError(f"{path}: frames without timestamps cannot be indexed; re-mux it as MP4")
            rate = stream.average_rate or stream.guessed_rate
            height, width = stream.codec_context.height, stream.codec_context.width
        order = np.argsort(pts, kind="stable")
        self.pts = np.asarray(pts)[order]
        self.keyframes = np.union1d([0], np.flatnonzero(np.asarray(keys)[order]))
        self.index_of = {int(p): t for t, p in enumerate(self.pts)}
        self.info = pixel_info(str(path), "video", len(pts), height, width, float(rate) if rate else None)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_frames = max(2, CACHE_BYTES // (height * width * 3))
        self.container: av.container.InputContainer | None = None
        self.decoder: Iterator[av.VideoFrame] | None = None
        self.next_index = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        count = 0
        with _open_container(self.path) as container:
            try:
                for frame in container.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
                    count += 1
            except av.FFmpegError as err:
                raise InputError(
                    f"{self.path}: decoding failed at frame {count}, the video is truncated or corrupt ({err})"
                ) from err
        if count < len(self):
            raise InputError(f"{self.path}: video is truncated, decoded {count} of {len(self)} frames")

    def _read(self, t: int) -> np.ndarray:
        if t in self.cache:
            self.cache.move_to_end(t)
            return self.cache[t]
        key = self.keyframes[np.searchsorted(self.keyframes, t, side="right") - 1]
        if self.decoder is None or not key <= self.next_index <= t:  # seek unless decoding on reaches t sooner
            self._seek(int(key))
        while t not in self.cache:
            index = self._decode_next()
            if index is None or index > t:
                raise InputError(f"{self.path}: frame {t} cannot be decoded, the video is truncated or corrupt")
        return self.cache[t]

    def _seek(self, key: int) -> None:
        if self.container is None:
            self.container = _open_container(self.path)
        stream = self.container.streams.video[0]
        self.container.seek(int(self.pts[key]), stream=stream, backward=True)
        self.decoder = iter(self.container.decode(stream))
        self.next_index = key

    def _decode_next(self) -> int | None:
        """Decode the next frame into the cache; its index, or None at the end of the stream."""
        try:
            frame = next(self.decoder)
            while frame.pts not in self.index_of:
                frame = next(self.decoder)
        except StopIteration:
            return None
        except av.FFmpegError as err:
            raise InputError(
                f"{self.path}: decoding failed near frame {self.next_index}, the video is truncated "
                f"or corrupt ({err})"
            ) from err
        index = self.index_of[frame.pts]
        self.cache[index] = frame.to_ndarray(format="rgb24")
        if len(self.cache) > self.cache_frames:
            self.cache.popitem(last=False)
        self.next_index = index + 1
        return index

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.decoder = None, None


def open_video(path: str | Path) -> VideoSource:
    """Open a frame folder, NIfTI 2D+t, MP4/AVI or DICOM cine (file or series folder) by its suffix."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
            return DicomSource(path)
        return FrameFolderSource(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return NiftiSource(path)
    if suffix in VIDEO_SUFFIXES:
        return VideoFileSource(path)
    if suffix == ".dcm":
        return DicomSource(path)
    raise InputError(
        f"{path}: unsupported video format {suffix!r}; use a frame folder, "
        f"{', '.join(NIFTI_SUFFIXES + VIDEO_SUFFIXES)} or .dcm"
    )


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


def _read_png_labels(path: Path) -> np.ndarray:
    """L/P/16-bit PNGs give their values (palette index for P); colour PNGs are mapped through the DAVIS palette."""
    try:
        with Image.open(path) as image:
            values = np.asarray(image)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: unreadable label image ({err})") from err
    if values.ndim == 3:
        rgb = values[..., :3]
        if rgb.shape[-1] < 3 or (rgb == rgb[..., :1]).all():
            return rgb[..., 0]
        colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
        codes = {tuple(c): k for k, c in enumerate(PALETTE.tolist())}
        if any(tuple(c) not in codes for c in colours.tolist()):
            raise InputError(
                f"{path}: colour mask with colours outside the DAVIS palette; save label maps as "
                "greyscale (L) or palette (P) PNGs holding the object numbers"
            )
        return np.asarray([codes[tuple(c)] for c in colours.tolist()], np.uint8)[inverse.ravel()].reshape(rgb.shape[:2])
    return values.astype(np.uint8) if values.dtype == bool else values


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
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            found = _read_nifti_annotations(path, info, frames[i] if frames is not None else 0)
        elif suffix == ".png":
            t = frames[i] if frames is not None else 0
            found = {_frame_index(path, t, info): _label_map(path, _read_png_labels(path), info)}
        else:
            raise InputError(f"{path}: unsupported annotation format {suffix!r}; use .png, .nii or .nii.gz")
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
    series = _NiftiSeries(path)
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
        return np.stack([_read_png_labels(p) for p in sorted(path.glob("*.png"), key=_natural_key)])
    series = _NiftiSeries(path)
    return series.block(0, series.num_frames)


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
        if _suffix(self.path) not in NIFTI_SUFFIXES:
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


def _davis_palette() -> np.ndarray:
    """The PASCAL VOC / DAVIS colour of each label (bit-interleaved), so overlays match the usual tools."""
    palette = np.zeros((256, 3), np.uint8)
    for label in range(256):
        value = label
        for bit in range(8):
            for channel in range(3):
                palette[label, channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
    return palette


PALETTE = _davis_palette()


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Frame with each object tinted in its palette colour and its contour drawn opaque."""
    colours = PALETTE[labels]
    inside = labels > 0
    out = frame.copy()
    out[inside] = (frame[inside] * (1 - alpha) + colours[inside] * alpha).astype(np.uint8)
    edge = np.zeros_like(inside)
    dx, dy = labels[:, 1:] != labels[:, :-1], labels[1:] != labels[:-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    edge &= inside
    out[edge] = colours[edge]
    return out


def _encoder(suffix: str) -> str:
    if suffix == ".mp4":
        try:
            return av.Codec("libx264", "w").name
        except av.codec.codec.UnknownCodecError:
            pass
    return "mpeg4"


def write_video(
    path: str | Path, frames: Iterable[np.ndarray], fps: float, keyframe_interval: int | None = None
) -> Path:
    """Stream ``H×W×3`` uint8 frames into an MP4 (H.264, else MPEG-4) or AVI (MPEG-4) file, yuv420p.

    Odd sizes are padded by one row/column (yuv420p needs even ones). MP4 puts its index first (faststart). A
    keyframe every ``keyframe_interval`` frames (default: every second) keeps seeking cheap.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: video output must be one of {VIDEO_SUFFIXES}")
    options = {"movflags": "faststart"} if suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[0] + frame.shape[0] % 2, frame.shape[1] + frame.shape[1] % 2
                stream = container.add_stream(_encoder(suffix), rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.codec_context.gop_size = keyframe_interval or max(1, round(fps))
                if stream.codec_context.name == "libx264":
                    stream.options = {"crf": "17"}
                else:
                    stream.bit_rate = int(width * height * fps)
            pad = ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.pad(frame, pad, mode="edge"), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frame to write")
        for packet in stream.encode():
            container.mux(packet)
    return path


def _write_gif(path: Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Stream frames into a looping GIF with one palette (from the first frame), one frame at a time: Pillow's
    ``save_all`` would keep every frame in memory."""
    duration = max(20, round(1000 / fps))
    with open(path, "wb") as fp:
        palette = None
        for frame in frames:
            image = Image.fromarray(frame)
            if palette is None:
                palette = image.quantize(256, dither=Image.Dither.NONE)
                for chunk in GifImagePlugin.getheader(palette, info={"loop": 0})[0]:
                    fp.write(chunk)
            indexed = image.quantize(palette=palette, dither=Image.Dither.NONE)
            for chunk in GifImagePlugin.getdata(indexed, duration=duration, disposal=1):
                fp.write(chunk)
        if palette is None:
            raise ValueError(f"{path}: no frame to write")
        fp.write(b";")
    return path


def write_overlay(
    path: str | Path,
    source: VideoSource,
    labels: Callable[[int], np.ndarray] | Sequence[np.ndarray],
    fps: float | None = None,
) -> Path:
    """Write the video with its label maps overlaid, frame by frame, as MP4 or GIF (by suffix).

    ``labels`` is ``t -> H×W`` label map or anything indexable by frame; ``fps`` defaults to the source's (or 10).
    """
    path = Path(path)
    label_of = labels if callable(labels) else labels.__getitem__
    frames = (overlay(frame, np.asarray(label_of(t), np.uint8)) for t, frame in enumerate(source))
    fps = fps or source.info.fps or 10.0
    if _suffix(path) == ".gif":
        return _write_gif(path, frames, fps)
    if _suffix(path) == ".mp4":
        return write_video(path, frames, fps)
    raise ValueError(f"{path}: overlay output must be .mp4 or .gif")
