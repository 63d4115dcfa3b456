"""Open every supported video kind as one lazy sequence of RGB frames with its geometry.

Kept apart from annotations and outputs because every consumer (inference, evaluation, baselines, synthetic data)
needs frames, while only some read label maps or write results. Conventions (shared with every module, see
``docs/interfaces.md``):

- A frame is ``H×W×3`` ``uint8`` RGB (grey inputs are repeated to 3 channels).
- NIfTI axis order: voxel index ``(i, j)`` is (column x, row y), as in ITK and MONAI, so
  ``frame[row, col] = data[col, row, t]`` (a frame is ``data[:, :, t].T``) and the affine maps ``(col, row, 0)`` to
  world coordinates. Accepted layouts: ``W×H×T`` (also a 3-D CT/MR volume ``W×H×D``, read slice by slice),
  ``W×H×1×T``, ``W×H×T×1``, RGB as ``W×H×T×3`` or the RGB24 dtype. ``VideoInfo.layout`` (a ``NiftiLayout``) keeps
  the input's shape, pixdims, units and qform/sform, so ``scripts.outputs`` writes labels that overlay on the input in
  a viewer; other inputs' labels are written ``W×H×1×T`` with ``pixdim[4] = 1 / fps`` seconds. Either way a written
  file reads back to exactly the same frames, affine, spacing and fps.
- ``VideoInfo.spacing`` is the pixel spacing in (x, y) = (column, row) order, as MONAI's ``pixdim``; ``affine`` is
  identity with unit spacing for frame folders and video files.
- MP4/AVI are lossy (see ``scripts.overlay.VIDEO_ROUND_TRIP_MAE``); NIfTI, DICOM and PNG round trips are exact.
- Every bad input raises ``InputError`` naming the file and the problem.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from monai.utils import optional_import
from numpy.lib import recfunctions
from PIL import Image

from scripts.errors import InputError

# PyAV (video) is a dependency, but imported lazily: training and evaluation on frame folders never need it, so a
# GPU host without its wheel still runs them; opening a video there fails with MONAI's OptionalImportError naming it.
av, _ = optional_import("av")

# The one table of input formats, asked by every job and the app: a file of one of these suffixes is a video of that
# kind; a folder is a DICOM series when it holds .dcm files, else a folder of FRAME_SUFFIXES images.
VIDEO_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".mp4": "video", ".avi": "video", ".dcm": "dicom"}
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
NIFTI_SUFFIXES = tuple(s for s, kind in VIDEO_FORMATS.items() if kind == "nifti")
VIDEO_SUFFIXES = tuple(s for s, kind in VIDEO_FORMATS.items() if kind == "video")
CACHE_BYTES = 64 * 2**20  # decoded frames kept for random access (video GOPs, NIfTI blocks)
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])  # NIfTI RGB voxels (read here, written by outputs)
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, RuntimeError)  # what decoders raise on bad bytes
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NiftiLayout:
    """How a NIfTI input stores its frames, so label outputs can be written in the same layout.

    A viewer overlays a label file on its image only if both have the same shape and the same qform/sform (with
    their codes); the time step or slice spacing of the frame axis lives in the pixdims and units.
    """

    shape: tuple[int, ...]  # the input's array shape without an RGB channel axis (W×H×T, W×H×1×T, W×H×D, ...)
    zooms: tuple[float, ...]  # the input's pixdim[1:8], every one: a W×H×T file may keep its frame time in pixdim[4]
    units: tuple[str, str]  # the input's xyzt units (space, time), nibabel's names
    qform: np.ndarray  # 4×4, with its qform_code
    qform_code: int
    sform: np.ndarray  # 4×4, with its sform_code
    sform_code: int


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
    layout: NiftiLayout | None = None  # NIfTI inputs: the layout their label outputs are written in


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


def path_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def video_kind(path: str | Path) -> str | None:
    """What `open_video` reads `path` as, from the format table: `frames`, `nifti`, `video`, `dicom`, or None (not a
    video format). Only a folder is looked into (for .dcm files)."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if any(p.suffix.lower() == ".dcm" for p in path.iterdir()) else "frames"
    return VIDEO_FORMATS.get(path_suffix(path))


def video_stem(name: str) -> str:
    """A video's name without its format suffix (`clip.nii.gz` → `clip`); other names unchanged."""
    for suffix in VIDEO_FORMATS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def natural_key(path: Path) -> list:
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


def read_rgb(path: Path) -> np.ndarray:
    """One frame image (JPEG/PNG, grey, palette or RGB) as H×W×3 uint8: how every job and training decode a frame."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except READ_ERRORS as err:
        raise InputError(f"{path}: unreadable image ({err})") from err


class FrameFolderSource(VideoSource):
    """A folder of frame images in name order (works on DAVIS ``JPEGImages/<seq>/``)."""

    def __init__(self, path: Path) -> None:
        self.files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=natural_key)
        if not self.files:
            raise InputError(f"{path}: zero frames, the folder holds no {'/'.join(FRAME_SUFFIXES)} image")
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
        except READ_ERRORS as err:
            raise InputError(f"{file}: unreadable image ({err})") from err

    def _read(self, t: int) -> np.ndarray:
        return read_rgb(self.files[t])


class NiftiSeries:
    """Lazy 2D+t view of a NIfTI file: ``block(t0, t1)`` gives ``n×H×W`` (or ``n×H×W×3``) in file values.

    nibabel's ``dataobj`` proxy is used directly because MONAI's ``NibabelReader`` loads the whole array.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # keep .nii.gz open so reading blocks in order decompresses the file once, not once per block
            self.image = nib.load(str(path), keep_file_open=path_suffix(path) == ".nii.gz")
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
        except READ_ERRORS as err:
            raise InputError(
                f"{self.path}: cannot read frames {t0}..{t1 - 1}, the file is truncated or corrupt ({err})"
            ) from err
        if self.rgb_dtype:
            values = recfunctions.structured_to_unstructured(values)
        return np.ascontiguousarray(np.moveaxis(values, 2, 0).swapaxes(1, 2))

    def layout(self) -> NiftiLayout:
        """The file's shape (less an RGB channel axis), pixdims, units and qform/sform, for writing labels alike."""
        header = self.image.header
        shape = tuple(self.image.shape)[:3] if self.channels else tuple(self.image.shape)
        space, time = header.get_xyzt_units()
        return NiftiLayout(
            shape=shape,
            zooms=tuple(float(z) for z in header["pixdim"][1:8]),
            units=(space, time),
            qform=header.get_qform(coded=False),
            qform_code=int(header["qform_code"]),
            sform=header.get_sform(coded=False),
            sform_code=int(header["sform_code"]),
        )

    def fps(self) -> float | None:
        """Frame rate from ``pixdim[4]`` when time is the 4th NIfTI dimension with a time unit.

        A 3-D file's ``pixdim[3]`` is not read as a frame time even with a time unit: NIfTI gives the 3rd axis a
        spatial unit, and CT/MR converters set ``sec`` on volumes whose 3rd pixdim is the slice spacing.
        """
        seconds = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(self.image.header.get_xyzt_units()[1])
        if not self.time_is_dim4 or seconds is None or self.image.header.get_zooms()[3] <= 0:
            return None
        return round(1.0 / (float(self.image.header.get_zooms()[3]) * seconds), 4)  # pixdim is float32


class NiftiSource(VideoSource):
    """A NIfTI 2D+t series read block by block (non-uint8 intensities are windowed to uint8)."""

    def __init__(self, path: Path) -> None:
        self.series = s = NiftiSeries(path)
        zooms = s.image.header.get_zooms()
        spacing = (float(zooms[0]), float(zooms[1]))
        self.info = VideoInfo(
            str(path), "nifti", s.num_frames, s.height, s.width, s.image.affine, spacing, s.fps(), s.layout()
        )
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
    kind = video_kind(path)
    if kind is None:
        raise InputError(
            f"{path}: unsupported video format {path_suffix(path)!r}; use a frame folder, "
            f"{', '.join(s for s in VIDEO_FORMATS if s != '.dcm')} or .dcm"
        )
    from scripts.readers_dicom import DicomSource  # it builds on this module's VideoSource

    sources = {"frames": FrameFolderSource, "nifti": NiftiSource, "video": VideoFileSource, "dicom": DicomSource}
    return sources[kind](path)
