"""DICOM cine reading for `scripts.readers.open_video` (a multi-frame file, or a folder holding one series).

ITK reads the pixels (MONAI's ``ITKReader``); the pixel spacing ITK does not know for ultrasound and enhanced objects
is read from the file's header here: PixelSpacing, else ImagerPixelSpacing, else the ultrasound regions, else 1.0 mm
with a warning.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
from monai.data import ITKReader

from scripts.errors import InputError
from scripts.readers import READ_ERRORS, VideoInfo, VideoSource, _rgb, _to_uint8, _window, natural_key

logger = logging.getLogger("scripts.readers")  # the readers' logger, as before the split


class DicomSource(VideoSource):
    """A DICOM cine (one multi-frame file, or a folder holding one series), read whole by MONAI's ``ITKReader``:
    ITK has no frame-by-frame reader, and cine clips are small."""

    def __init__(self, path: Path) -> None:
        reader = ITKReader(affine_lps_to_ras=True)
        try:
            data, meta = reader.get_data(reader.read(str(path)))
        except READ_ERRORS as err:
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
        itk_spacing = np.asarray(meta.get("spacing", (1.0, 1.0)), dtype=float)[:2]
        spacing = _dicom_spacing(path, meta, (float(itk_spacing[0]), float(itk_spacing[1])))
        affine = np.asarray(meta["affine"], dtype=float).copy()
        affine[:3, :2] *= np.asarray(spacing) / itk_spacing  # ITK's columns are direction × its own spacing
        height, width = self.frames.shape[1:3]
        self.info = VideoInfo(str(path), "dicom", len(self.frames), height, width, affine, spacing, _dicom_fps(meta))

    def _read(self, t: int) -> np.ndarray:
        return _rgb(self.frames[t])


def _pixel_spacing(text: str) -> tuple[float, float] | None:
    """(x, y) of a DICOM ``row\\column`` spacing value, or None unless it is two positive numbers."""
    try:
        row, col = (float(v) for v in text.strip(" \0").split("\\"))
    except ValueError:
        return None
    return (col, row) if row > 0 and col > 0 else None  # DICOM gives the row spacing (y) first


def _dicom_spacing(path: Path, meta: dict, itk_spacing: tuple[float, float]) -> tuple[float, float]:
    """(x, y) pixel spacing in mm, from the first of PixelSpacing (0028,0030), ImagerPixelSpacing (0018,1164), the
    ultrasound regions' physical deltas, a PixelSpacing inside a sequence (a functional group), the spacing ITK read;
    else 1.0 with a warning.

    ITK (GDCM) reads PixelSpacing only for some SOP classes and reports 1.0 for e.g. secondary captures, while its
    metadata dictionary still holds the top-level tags; it holds no sequence items, hence ``_dicom_header``.
    """
    for key in ("0028|0030", "0018|1164"):
        spacing = _pixel_spacing(str(meta.get(key, "")))
        if spacing is not None:
            return spacing
    file = path if path.is_file() else min((p for p in path.iterdir() if p.suffix.lower() == ".dcm"), key=natural_key)
    header = _dicom_header(file)
    spacing = _ultrasound_spacing(header) or _nested_pixel_spacing(header)
    if spacing is not None:
        return spacing
    if itk_spacing != (1.0, 1.0):
        return itk_spacing
    logger.warning(
        f"{path}: no pixel spacing found (PixelSpacing, ImagerPixelSpacing or ultrasound regions); 1.0 mm assumed"
    )
    return 1.0, 1.0


# little-endian tag bytes: PhysicalUnitsX/YDirection, PhysicalDeltaX/Y of an ultrasound region, PixelSpacing, pixels
US_UNIT_TAGS = (struct.pack("<HH", 0x0018, 0x6024), struct.pack("<HH", 0x0018, 0x6026))
US_DELTA_TAGS = (struct.pack("<HH", 0x0018, 0x602C), struct.pack("<HH", 0x0018, 0x602E))
PIXEL_SPACING_TAG = struct.pack("<HH", 0x0028, 0x0030)
PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)


def _dicom_header(file: Path) -> bytes:
    """The bytes of a DICOM file before its pixel data, where sequence items are found by their little-endian tag
    and length bytes (explicit or implicit VR): neither ITK's metadata dictionary nor MONAI exposes them."""
    header = b""
    try:
        with open(file, "rb") as f:
            while PIXEL_DATA_TAG not in header and (chunk := f.read(2**20)):
                header += chunk
    except OSError:
        return b""
    return header.split(PIXEL_DATA_TAG)[0]


def _fixed_values(header: bytes, tag: bytes, vr: bytes, fmt: str) -> list:
    """Values of every element ``tag`` of fixed size ``fmt`` in ``header``, in file order."""
    size = struct.calcsize(fmt)
    found = []
    for prefix in (tag + vr + struct.pack("<H", size), tag + struct.pack("<I", size)):
        start = header.find(prefix)
        while 0 <= start <= len(header) - len(prefix) - size:
            found.append((start, struct.unpack_from(fmt, header, start + len(prefix))[0]))
            start = header.find(prefix, start + 1)
    return [v for _, v in sorted(found)]


def _ultrasound_spacing(header: bytes) -> tuple[float, float] | None:
    """(x, y) mm spacing of the first ultrasound region (0018,6011) measured in cm in both directions, or None."""
    units = [_fixed_values(header, tag, b"US", "<H") for tag in US_UNIT_TAGS]
    deltas = [_fixed_values(header, tag, b"FD", "<d") for tag in US_DELTA_TAGS]
    for unit_x, unit_y, dx, dy in zip(*units, *deltas):
        if unit_x == unit_y == 3 and dx > 0 and dy > 0:  # 3: cm
            return 10.0 * dx, 10.0 * dy
    return None


def _nested_pixel_spacing(header: bytes) -> tuple[float, float] | None:
    """(x, y) of the first PixelSpacing anywhere in the header, e.g. a functional group's Pixel Measures, or None."""
    start = header.find(PIXEL_SPACING_TAG)
    while 0 <= start <= len(header) - 8:
        explicit = header[start + 4 : start + 6] == b"DS"
        size = struct.unpack_from("<H" if explicit else "<I", header, start + 6 if explicit else start + 4)[0]
        if 0 < size <= 64:
            spacing = _pixel_spacing(header[start + 8 : start + 8 + size].decode("ascii", "replace"))
            if spacing is not None:
                return spacing
        start = header.find(PIXEL_SPACING_TAG, start + 1)
    return None


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
