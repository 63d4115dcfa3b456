"""DICOM Segmentation output for DICOM inputs, so PACS and DICOM viewers receive the labels beside the source series.

The SEG is written with ``highdicom`` as one multi-frame BINARY Segmentation: one segment per label value of the
result, named from a ``--labels`` map (``1=vocal folds,2=glottis``) or ``label_<n>``, each frame referencing its
source frame (study, series and SOP instance UIDs, frame of reference, pixel spacing and plane positions, which
highdicom copies from the source). highdicom places segmentation frames in space, so the source frames must have a
frame of reference and distinct plane positions (a series of slices, or an enhanced multi-frame object); a cine
acquired in one plane, or one without a frame of reference, cannot be referenced that way and is refused with the
reason (`seg_source_problem`). The source's own headers are read with ``pydicom``; its pixels are never read here.

What the SEG needs is checked before any propagation (`trial_segmentation` builds one from the headers, with a pixel
of every segment on every frame): the Type 2 patient and study attributes a source may lack (`TYPE2`, e.g. a CT
series without PatientBirthDate) are given empty values, as the standard allows, and anything else highdicom cannot
take is found then, not after the propagation. highdicom logs each step of a build at INFO; that is silenced.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from scripts.errors import InputError
from scripts.readers import READ_ERRORS, video_kind

SEG_SUFFIX = "_seg.dcm"
_METADATA = Path(__file__).resolve().parents[1] / "configs" / "metadata.json"
# Type 2 attributes of the Patient and General Study modules that highdicom copies from the source and needs present;
# Type 2 means present but possibly empty, so a source lacking one gets an empty value
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm`` file or a folder holding one: what `scripts.readers.open_video` reads as DICOM."""
    return video_kind(path) == "dicom"


def parse_labels(value: str | Mapping | None) -> dict[int, str]:
    """``--labels``: ``1=vocal folds,2=glottis`` (or a mapping) → {label value: segment name}."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    items = value.items() if isinstance(value, Mapping) else (p.partition("=")[::2] for p in str(value).split(","))
    names = {}
    for key, name in items:
        try:
            label = int(str(key).strip())
        except ValueError:
            label = -1
        if not 1 <= label <= 255 or not str(name).strip():
            raise InputError(f"--labels: {value!r}: write the names as 1=NAME,2=NAME (label values 1..255)")
        names[label] = str(name).strip()
    return names


def read_source(path: str | Path) -> list:
    """The source's DICOM headers (no pixels), in the order the reader gives its frames: a series' files sorted
    along the slice normal (as ITK's series reader does), a multi-frame file as it is."""
    import pydicom

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm") if path.is_dir() else [path]
    datasets = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
        except (pydicom.errors.InvalidDicomError, *READ_ERRORS) as exc:
            raise InputError(f"{file}: unreadable DICOM ({exc})") from exc
    if len(datasets) > 1:
        datasets.sort(key=_position_along_normal)
    for ds in datasets:  # headers in memory only: the source files are never written
        for keyword in TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return datasets


def _position_along_normal(ds) -> float:
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        return float(np.cross(orientation[:3], orientation[3:]) @ np.asarray(ds.ImagePositionPatient, float))
    except (AttributeError, ValueError, TypeError):
        return float(getattr(ds, "InstanceNumber", 0) or 0)


def _positions(datasets: list) -> list[tuple] | None:
    """Each frame's ImagePositionPatient (per-frame functional groups of a multi-frame file), or None if missing."""
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
        try:
            groups = datasets[0].PerFrameFunctionalGroupsSequence
            return [tuple(float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient) for g in groups]
        except (AttributeError, IndexError):
            return None
    try:
        return [tuple(float(v) for v in ds.ImagePositionPatient) for ds in datasets]
    except (AttributeError, ValueError, TypeError):
        return None


def seg_source_problem(datasets: list) -> str | None:
    """Why a DICOM SEG cannot reference these frames (highdicom needs a frame of reference and distinct plane
    positions), or None."""
    first = datasets[0]
    if "FrameOfReferenceUID" not in first:
        return "the source has no FrameOfReferenceUID"
    positions = _positions(datasets)
    if positions is None:
        return "the source frames have no plane positions (ImagePositionPatient)"
    if len(set(positions)) != len(positions):
        return "the source frames share a plane position (a cine in one plane), which highdicom cannot reference"
    return None


def check_source(path: str | Path) -> list:
    """The source headers, or an `InputError` naming the source and why no SEG can reference it."""
    datasets = read_source(path)
    problem = seg_source_problem(datasets)
    if problem is not None:
        raise InputError(f"{path}: cannot write a DICOM SEG: {problem}")
    return datasets


def _version() -> str:
    try:
        return str(json.loads(_METADATA.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def _frames(datasets: list) -> int:
    return int(getattr(datasets[0], "NumberOfFrames", 1) or 1) if len(datasets) == 1 else len(datasets)


def _where(datasets: list) -> Path:
    """The source as a user named it: the file, or the series' folder."""
    where = Path(str(getattr(datasets[0], "filename", "") or "the DICOM source"))
    return where.parent if len(datasets) > 1 else where


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs every step of a build at INFO (a screenful per SEG); only its warnings are kept."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def build_dicom_seg(datasets: list, labels: np.ndarray, names: Mapping[int, str] | None = None):
    """The DICOM SEG (a highdicom `Segmentation`, in memory) of ``T×H×W`` uint8 ``labels``, frame t on the source's
    frame t; ``datasets`` are the source headers from `check_source`. Headers highdicom cannot use raise an
    `InputError` naming the source."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels, np.uint8)  # a writer's frames, read back once
    frames, rows, columns = _frames(datasets), int(datasets[0].Rows), int(datasets[0].Columns)
    if labels.shape != (frames, rows, columns):
        raise ValueError(f"labels are {labels.shape} (T×H×W) but the source has {frames}×{rows}×{columns}")
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise ValueError("the labels hold no segment")
    names = names or {}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="TCMN", version=_version(), family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names.get(value, f"label_{value}"),
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(values, 1)
    ]
    masks = np.stack([labels == value for value in values], axis=-1)  # T×H×W×segments
    try:
        with _quiet_highdicom():
            seg = _segmentation(hd, datasets, masks, segments)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # what highdicom raises on headers it cannot use
        raise InputError(
            f"{_where(datasets)}: cannot write a DICOM SEG referencing it ({exc}); --save_dicom_seg false skips the SEG"
        ) from exc
    _add_slice_thickness(seg, datasets)
    return seg


def trial_segmentation(datasets: list, values: Iterable[int], names: Mapping[int, str] | None = None) -> None:
    """Build (and drop) a SEG from the source headers with one pixel of each label value in ``values`` on the first
    and the last frame, so that whatever highdicom cannot take in the headers (it checks every source frame's) or the
    segment names is found before propagation; raises `build_dicom_seg`'s `InputError`. The propagated labels only
    ever hold the annotations' values. Two frames, not all: encoding frames is what a build spends its time on."""
    values = sorted({int(v) for v in values if int(v) != 0})
    labels = np.zeros((_frames(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), np.uint8)
    for i, value in enumerate(values[: labels.shape[2]]):
        labels[[0, -1], 0, i] = value
    build_dicom_seg(datasets, labels, names)


def write_dicom_seg(
    path: str | Path, source: str | Path | list, labels: np.ndarray, names: Mapping[int, str] | None = None
) -> Path:
    """Write ``T×H×W`` uint8 ``labels`` (frame t of the source's frame t) as a DICOM SEG at ``path``; ``source`` is
    the DICOM input (file or series folder) or its headers from `check_source`."""
    datasets = check_source(source) if isinstance(source, (str, Path)) else source
    return save_dicom_seg(build_dicom_seg(datasets, labels, names), path)


def save_dicom_seg(seg, path: str | Path) -> Path:
    """Save a built SEG; a failed write raises the `OSError` behind pydicom's re-raised copy (which drops its errno)
    with ``path`` as its file name, so that it is reported like any other output's."""
    try:
        seg.save_as(str(path))
    except OSError as exc:
        cause: BaseException | None = exc
        while cause is not None and not (isinstance(cause, OSError) and cause.errno is not None):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from exc
    return Path(path)


def _add_slice_thickness(seg, datasets: list) -> None:
    """Give the SEG's Pixel Measures a SliceThickness where the source had none (ITK's multi-frame files): highdicom
    copies the source's measures as they are, yet needs the thickness to read the SEG back. It is the source's
    SpacingBetweenSlices, else the distance between its planes, else 1 mm."""
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if not measures or measures[0].get("SliceThickness"):
        return
    thickness = measures[0].get("SpacingBetweenSlices")
    if not thickness:
        positions = np.asarray(_positions(datasets) or [], float)
        steps = np.linalg.norm(np.diff(positions, axis=0), axis=1) if len(positions) > 1 else np.zeros(0)
        thickness = float(np.median(steps)) if steps.size and np.median(steps) > 0 else 1.0
    measures[0].SliceThickness = float(thickness)


def _segmentation(hd, datasets: list, masks: np.ndarray, segments: list):
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="TCMN MONAI bundle",
        manufacturer_model_name="TCMN",
        software_versions=_version(),
        device_serial_number="none",
        series_description="TCMN propagated labels",
    )
