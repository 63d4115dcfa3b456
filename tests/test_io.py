"""Reading, validating and writing videos, series, annotations and overlays (scripts.readers, scripts.annotations,
scripts.outputs, scripts.overlay)."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from conftest import AFFINE, SAMPLE_SEQUENCE, write_nifti_series
from PIL import Image

from scripts.annotations import read_annotations, read_label_map, read_label_series
from scripts.data import ClipDataset, list_sequences
from scripts.errors import InputError
from scripts.outputs import LabelSeriesWriter, write_png_labels
from scripts.overlay import PALETTE, VIDEO_ROUND_TRIP_MAE, write_overlay, write_video
from scripts.readers import open_video
from scripts.staging import staged_output
from scripts.validation import SequenceDataset


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


def run_pipeline(video: Path, masks: list[Path], frames: list[int] | None, out: Path, overwrite: bool = False) -> None:
    """What an inference entry point does with user inputs: stage outputs, read and validate, write labels."""
    with staged_output(out, ["labels.nii.gz"], overwrite) as staging:
        source = open_video(video)
        annotations = read_annotations(masks, frames, source.info)
        first = min(annotations)
        with LabelSeriesWriter(staging / "labels.nii.gz", source.info) as writer:
            for t, _ in enumerate(source):
                writer.write(t, annotations[first])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def assert_input_error(error: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(error.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


@pytest.fixture
def clip_labels_png(tmp_path: Path, echo_clip) -> Path:
    path = tmp_path / "mask.png"
    Image.fromarray(echo_clip[1][0]).save(path)
    return path


# ---------------------------------------------------------------- reading and round trips


def test_frame_folder_png_round_trip_is_exact(clip_files, echo_clip, tmp_path):
    frames, _ = echo_clip
    source = open_video(clip_files["frames"])
    assert (source.info.kind, len(source), source.info.height, source.info.width) == ("frames", 8, 64, 80)
    np.testing.assert_array_equal(np.stack(list(source)), frames)
    for t, frame in enumerate(source):
        Image.fromarray(frame).save(tmp_path / f"{t}.png")  # natural name order: 10.png would follow 9.png
    np.testing.assert_array_equal(np.stack(list(open_video(tmp_path))), frames)


def test_sample_clip_opens_with_its_annotation(sample_dir):
    source = open_video(sample_dir / "JPEGImages" / SAMPLE_SEQUENCE)
    assert (len(source), source.info.height, source.info.width) == (24, 512, 512)
    assert source[23].shape == (512, 512, 3) and source[23].dtype == np.uint8
    masks = sorted((sample_dir / "Annotations" / SAMPLE_SEQUENCE).glob("*.png"))
    annotations = read_annotations(masks[:1], [0], source.info)
    assert set(np.unique(annotations[0])) >= {0, 1, 2, 3}


def test_sample_is_a_small_unchanged_cut(sample_dir):
    size = sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file())
    assert size <= 3 * 2**20
    meta = json.loads((sample_dir / "meta.json").read_text())
    assert meta["licence"] == "CC BY 4.0" and meta["sequences"][SAMPLE_SEQUENCE]["n_frames"] == 24
    assert len(list((sample_dir / "Annotations" / SAMPLE_SEQUENCE).glob("*.png"))) == 24


def test_sample_files_are_copies_of_the_source(sample_dir, shared_data):
    for sample in sorted(sample_dir.rglob(f"{SAMPLE_SEQUENCE}/*")):
        source = shared_data / "vocalfolds" / sample.relative_to(sample_dir)
        assert sample.read_bytes() == source.read_bytes(), sample


@pytest.mark.parametrize("kind", ["frames", "nifti", "dicom", "mp4", "avi"])
def test_random_access_matches_iteration(clip_files, kind):
    source = open_video(clip_files[kind])
    frames = list(source)
    assert len(frames) == len(source) == 8
    for t in reversed(range(len(source))):  # the backward pass of propagation
        np.testing.assert_array_equal(source[t], frames[t])
    for t in (-1, len(source)):
        with pytest.raises(IndexError):
            source[t]


def test_nifti_round_trip_keeps_frames_and_geometry(clip_files, echo_clip, tmp_path):
    source = open_video(clip_files["nifti"])
    assert source.info.kind == "nifti"
    np.testing.assert_allclose(source.info.affine, AFFINE)
    assert source.info.spacing == (0.5, 0.25) and source.info.fps == 20.0
    np.testing.assert_array_equal(np.stack(list(source)), echo_clip[0])
    write_nifti_series(tmp_path / "again.nii", np.stack(list(source))[..., 0], source.info.affine, source.info.fps)
    again = open_video(tmp_path / "again.nii")
    np.testing.assert_array_equal(again.info.affine, source.info.affine)
    assert (again.info.spacing, again.info.fps) == (source.info.spacing, source.info.fps)
    np.testing.assert_array_equal(np.stack(list(again)), echo_clip[0])


def _rgb24(frames: np.ndarray) -> np.ndarray:
    out = np.zeros(frames.shape[:-1], [("R", "u1"), ("G", "u1"), ("B", "u1")])
    out["R"], out["G"], out["B"] = frames[..., 0], frames[..., 1], frames[..., 2]
    return out


@pytest.mark.parametrize(
    "layout, grey",
    [
        (lambda f: f[..., 0].transpose(2, 1, 0), True),  # W×H×T
        (lambda f: f.transpose(2, 1, 0, 3), False),  # W×H×T×3
        (lambda f: _rgb24(f).transpose(2, 1, 0)[:, :, None], False),  # W×H×1×T of RGB24
    ],
    ids=["WxHxT", "WxHxTx3", "rgb24"],
)
def test_nifti_layouts_read_exactly(tmp_path, smooth_clip, layout, grey):
    nib.save(nib.Nifti1Image(layout(smooth_clip), AFFINE), tmp_path / "clip.nii.gz")
    expected = np.repeat(smooth_clip[..., :1], 3, -1) if grey else smooth_clip
    np.testing.assert_array_equal(np.stack(list(open_video(tmp_path / "clip.nii.gz"))), expected)


def test_nifti_non_uint8_is_windowed_to_uint8(tmp_path):
    values = np.linspace(-1000, 3000, 8 * 64 * 80, dtype=np.float32).reshape(8, 64, 80)
    write_nifti_series(tmp_path / "ct.nii.gz", values)
    frames = np.stack(list(open_video(tmp_path / "ct.nii.gz")))[..., 0]
    assert frames.dtype == np.uint8 and frames.min() == 0 and frames.max() == 255
    assert (np.diff(frames.ravel().astype(int)) >= 0).all()  # windowing keeps the intensity order


def test_mp4_round_trip_within_tolerance(clip_files, smooth_clip, tmp_path):
    source = open_video(clip_files["mp4"])
    assert (source.info.kind, len(source), source.info.fps) == ("video", 8, 20.0)
    assert mae(np.stack(list(source)), smooth_clip) < VIDEO_ROUND_TRIP_MAE
    write_video(tmp_path / "again.mp4", source, source.info.fps)
    assert mae(np.stack(list(open_video(tmp_path / "again.mp4"))), smooth_clip) < VIDEO_ROUND_TRIP_MAE


def test_video_seeks_across_keyframes(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (30, 32, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "gop.mp4", frames, 10.0, keyframe_interval=4)
    source = open_video(tmp_path / "gop.mp4")
    assert len(source.keyframes) > 3
    decoded = list(source)
    for t in (29, 3, 17, 16, 0, 28, 15):
        np.testing.assert_array_equal(source[t], decoded[t])


def test_avi_reads_within_tolerance(clip_files, smooth_clip):
    source = open_video(clip_files["avi"])
    assert len(source) == 8 and mae(np.stack(list(source)), smooth_clip) < VIDEO_ROUND_TRIP_MAE


@pytest.mark.parametrize("rgb", [False, True], ids=["grey", "rgb"])
def test_dicom_multiframe_round_trip_is_exact(tmp_path, echo_clip, smooth_clip, rgb):
    frames = smooth_clip if rgb else echo_clip[0]
    array = frames if rgb else np.ascontiguousarray(frames[..., 0])
    itk.imwrite(itk.image_from_array(array, is_vector=rgb), str(tmp_path / "cine.dcm"))
    source = open_video(tmp_path / "cine.dcm")
    assert (source.info.kind, len(source)) == ("dicom", 8)
    read = np.stack(list(source))
    np.testing.assert_array_equal(read, frames)
    itk.imwrite(itk.image_from_array(read if rgb else read[..., 0], is_vector=rgb), str(tmp_path / "again.dcm"))
    again = open_video(tmp_path / "again.dcm")
    np.testing.assert_array_equal(np.stack(list(again)), frames)
    np.testing.assert_array_equal(again.info.affine, source.info.affine)


# ---------------------------------------------------------------- geometry: labels overlay on their input

# a rotated, offset, non-unit-spacing geometry, exact in float32 (a CT/MR volume's kind)
OBLIQUE = np.array([[0.0, -0.7, 0.0, 10.5], [0.8, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    "name, make, zooms, units, codes, out_shape",
    [
        (
            "volume",
            lambda f: f[..., 0].transpose(2, 1, 0).astype(np.int16) - 500,
            (0.8, 0.7, 2.5),
            ("mm", "unknown"),
            (1, 1),
            (80, 64, 8),
        ),
        ("WxHxT", lambda f: f[..., 0].transpose(2, 1, 0), (0.5, 0.25, 0.04), ("mm", "sec"), (0, 2), (80, 64, 8)),
        (
            "WxHx1xT",
            lambda f: f[..., 0].transpose(2, 1, 0)[:, :, None],
            (0.5, 0.25, 1.0, 0.04),
            ("mm", "sec"),
            (0, 2),
            (80, 64, 1, 8),
        ),
        ("WxHxTx3", lambda f: f.transpose(2, 1, 0, 3), (0.5, 0.25, 0.04, 1.0), ("mm", "sec"), (1, 0), (80, 64, 8)),
    ],
)
def test_label_series_has_the_nifti_input_layout(tmp_path, smooth_clip, name, make, zooms, units, codes, out_shape):
    """Same shape (less an RGB axis), affine, qform/sform codes, pixdims and units: the labels overlay in a viewer."""
    affine = (OBLIQUE if name == "volume" else AFFINE).copy()
    affine[:3, 2] *= zooms[2] / np.linalg.norm(affine[:3, 2])  # the qform's 3rd zoom is pixdim[3]
    image = nib.Nifti1Image(make(smooth_clip), affine)
    image.header.set_zooms(zooms)
    image.header.set_qform(affine, codes[0])
    image.header.set_sform(affine, codes[1])
    image.header.set_xyzt_units(*units)
    nib.save(image, tmp_path / f"{name}.nii.gz")
    source = open_video(tmp_path / f"{name}.nii.gz")
    labels = (np.stack(list(source))[..., 0] // 64).astype(np.uint8)
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", source.info) as writer:
        for t in range(len(source)):
            writer.write(t, labels[t])
    given, written = nib.load(tmp_path / f"{name}.nii.gz"), nib.load(tmp_path / "labels.nii.gz")
    assert (int(given.header["qform_code"]), int(given.header["sform_code"])) == codes
    assert written.shape == out_shape and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, given.affine)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == codes
    np.testing.assert_array_equal(written.header.get_zooms(), given.header.get_zooms()[: len(out_shape)])
    assert written.header.get_xyzt_units() == units
    np.testing.assert_array_equal(read_label_series(tmp_path / "labels.nii.gz"), labels)
    again = open_video(tmp_path / "labels.nii.gz").info
    assert (again.spacing, again.fps) == (source.info.spacing, source.info.fps)
    assert source.info.fps == (25.0 if name == "WxHx1xT" else None)  # only a 4th axis is time for NIfTI


def test_every_pixdim_of_a_nifti_input_is_kept(tmp_path, smooth_clip):
    """A W×H×T file (dim[0] = 3) whose user stored the frame interval in pixdim[4], beyond its dimensions, and
    values in pixdim[5..7]: the label series carries every pixdim as given."""
    image = nib.Nifti1Image(smooth_clip[..., 0].transpose(2, 1, 0), AFFINE)
    image.header["pixdim"][1:8] = (0.5, 0.25, 2.0, 0.04, 3.0, 5.0, 7.0)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, tmp_path / "clip.nii.gz")
    source = open_video(tmp_path / "clip.nii.gz")
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", source.info) as writer:
        for t in range(len(source)):
            writer.write(t, np.zeros((source.info.height, source.info.width), np.uint8))
    given, written = nib.load(tmp_path / "clip.nii.gz").header, nib.load(tmp_path / "labels.nii.gz").header
    assert int(written["dim"][0]) == 3 and float(written["pixdim"][4]) == pytest.approx(0.04)
    np.testing.assert_array_equal(written["pixdim"][1:8], given["pixdim"][1:8])


def _dicom_element(group: int, element: int, vr: str, value: bytes | str) -> bytes:
    """One explicit-VR little-endian DICOM element."""
    if isinstance(value, str):
        value = value.encode() + (b"" if len(value) % 2 == 0 else b"\0" if vr == "UI" else b" ")
    if vr in ("OB", "SQ"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _write_dicom(path: Path, frames: np.ndarray, sop_class: str, extra: list[tuple]) -> None:
    """A multi-frame grey DICOM holding exactly the given attributes, as devices export them: ITK's writer would put
    the spacing in a functional group, where ITK also reads it, and drops a top-level PixelSpacing."""
    uid = "1.2.826.0.1.3680043.8.498.7"
    meta = b"".join(
        _dicom_element(0x0002, e, vr, v)
        for e, vr, v in [(1, "OB", b"\0\1"), (2, "UI", sop_class), (3, "UI", uid), (0x10, "UI", "1.2.840.10008.1.2.1")]
    )
    meta = _dicom_element(0x0002, 0, "UL", struct.pack("<I", len(meta))) + meta
    t, h, w = frames.shape
    u16 = struct.Struct("<H").pack
    elements = [
        (0x0008, 0x0016, "UI", sop_class),
        (0x0008, 0x0018, "UI", uid),
        (0x0008, 0x0060, "CS", "OT"),
        (0x0020, 0x000D, "UI", uid + ".1"),
        (0x0020, 0x000E, "UI", uid + ".2"),
        (0x0028, 0x0002, "US", u16(1)),
        (0x0028, 0x0004, "CS", "MONOCHROME2"),
        (0x0028, 0x0008, "IS", str(t)),
        (0x0028, 0x0010, "US", u16(h)),
        (0x0028, 0x0011, "US", u16(w)),
        (0x0028, 0x0100, "US", u16(8)),
        (0x0028, 0x0101, "US", u16(8)),
        (0x0028, 0x0102, "US", u16(7)),
        (0x0028, 0x0103, "US", u16(0)),
        (0x7FE0, 0x0010, "OB", frames.tobytes()),
        *extra,
    ]
    body = b"".join(_dicom_element(*e) for e in sorted(elements, key=lambda e: e[:2]))
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body)


def _ultrasound_region(delta_x_cm: float, delta_y_cm: float) -> tuple:
    """SequenceOfUltrasoundRegions (0018,6011) with one region measured in cm (units code 3)."""
    item = b"".join(
        _dicom_element(0x0018, e, vr, v)
        for e, vr, v in [
            (0x6024, "US", struct.pack("<H", 3)),
            (0x6026, "US", struct.pack("<H", 3)),
            (0x602C, "FD", struct.pack("<d", delta_x_cm)),
            (0x602E, "FD", struct.pack("<d", delta_y_cm)),
        ]
    )
    return 0x0018, 0x6011, "SQ", struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7.2"  # multi-frame grayscale byte SC
ULTRASOUND_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


@pytest.mark.parametrize(
    "sop_class, spacing_element",
    [
        (SECONDARY_CAPTURE, (0x0028, 0x0030, "DS", "0.25\\0.3")),  # PixelSpacing: row (y) spacing first
        (SECONDARY_CAPTURE, (0x0018, 0x1164, "DS", "0.25\\0.3")),  # ImagerPixelSpacing
        (ULTRASOUND_MULTIFRAME, _ultrasound_region(0.03, 0.025)),  # physical deltas in cm
    ],
    ids=["PixelSpacing", "ImagerPixelSpacing", "ultrasound-regions"],
)
def test_dicom_spacing_is_read_from_the_file(tmp_path, echo_clip, caplog, sop_class, spacing_element):
    frames = np.ascontiguousarray(echo_clip[0][..., 0])
    _write_dicom(tmp_path / "cine.dcm", frames, sop_class, [spacing_element])
    with caplog.at_level(logging.WARNING, logger="scripts.readers"):
        source = open_video(tmp_path / "cine.dcm")
    assert not [r for r in caplog.records if r.name == "scripts.readers"]  # the bundle's own, not ITK's or MONAI's
    assert source.info.spacing == pytest.approx((0.3, 0.25))
    np.testing.assert_allclose(np.abs(source.info.affine[:3, :2]).sum(0), (0.3, 0.25))
    np.testing.assert_array_equal(np.stack(list(source))[..., 0], frames)
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", source.info) as writer:
        for t in range(len(source)):
            writer.write(t, echo_clip[1][t])
    assert open_video(tmp_path / "labels.nii.gz").info.spacing == pytest.approx((0.3, 0.25))


def test_dicom_without_spacing_warns_that_1mm_is_assumed(tmp_path, echo_clip, caplog):
    _write_dicom(tmp_path / "cine.dcm", np.ascontiguousarray(echo_clip[0][..., 0]), SECONDARY_CAPTURE, [])
    with caplog.at_level(logging.WARNING, logger="scripts.readers"):
        source = open_video(tmp_path / "cine.dcm")
    assert source.info.spacing == (1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if r.name == "scripts.readers"] == [
        f"{tmp_path / 'cine.dcm'}: no pixel spacing found (PixelSpacing, ImagerPixelSpacing or ultrasound regions); "
        "1.0 mm assumed"
    ]


def test_dicom_spacing_in_a_functional_group_is_read_without_warning(tmp_path, echo_clip, caplog):
    """ITK writes the spacing into the shared functional groups' Pixel Measures, 1\\1 when the image has none."""
    frames = np.ascontiguousarray(echo_clip[0][..., 0])
    for name, spacing in (("measured.dcm", (0.3, 0.25)), ("unit.dcm", (1.0, 1.0))):
        image = itk.image_from_array(frames)
        image.SetSpacing([*spacing, 1.0])
        itk.imwrite(image, str(tmp_path / name))
        with caplog.at_level(logging.WARNING, logger="scripts.readers"):
            assert open_video(tmp_path / name).info.spacing == pytest.approx(spacing)
    assert not [r for r in caplog.records if r.name == "scripts.readers"]  # the bundle's own, not ITK's or MONAI's


# ---------------------------------------------------------------- annotations


def test_annotations_png_and_nifti_series(clip_files, echo_clip, tmp_path, clip_labels_png):
    info = open_video(clip_files["nifti"]).info
    labels = echo_clip[1]
    annotations = read_annotations([clip_labels_png], [3], info)
    assert list(annotations) == [3]
    np.testing.assert_array_equal(annotations[3], labels[0])
    series = np.zeros_like(labels)
    series[[2, 5]] = labels[[2, 5]]
    write_nifti_series(tmp_path / "series.nii.gz", series, info.affine)
    annotations = read_annotations([tmp_path / "series.nii.gz"], None, info)
    assert sorted(annotations) == [2, 5]
    np.testing.assert_array_equal(annotations[5], labels[5])


def test_colour_mask_maps_through_the_davis_palette(clip_files, echo_clip, tmp_path):
    labels = echo_clip[1][0]
    Image.fromarray(PALETTE[labels]).save(tmp_path / "rgb.png")
    palette_png = Image.fromarray(labels, mode="L").convert("P")
    palette_png.putpalette(PALETTE.ravel().tolist())
    palette_png.save(tmp_path / "p.png")
    info = open_video(clip_files["frames"]).info
    for name in ("rgb.png", "p.png"):
        np.testing.assert_array_equal(read_annotations([tmp_path / name], None, info)[0], labels)


def _objects(labels: list[int] | None = None) -> np.ndarray:
    """A 64×64 label map with one square per label (default 1, 2 and 3)."""
    out = np.zeros((64, 64), np.uint8)
    for i, k in enumerate(labels or [1, 2, 3]):
        out[8 + 16 * i : 20 + 16 * i, 8 + 12 * i : 30 + 12 * i] = k
    return out


def _save_palette_png(labels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(labels, mode="L").convert("P")
    image.putpalette(PALETTE.ravel().tolist())
    image.save(path)


@pytest.mark.parametrize(
    "save",
    [
        _save_palette_png,
        lambda labels, path: Image.fromarray(labels, mode="L").save(path),
        lambda labels, path: Image.fromarray(PALETTE[labels]).save(path),
        lambda labels, path: Image.fromarray(labels.astype(np.uint16)).save(path),
    ],
    ids=["palette", "grey", "colour", "16-bit"],
)
def test_read_label_map_gives_the_object_numbers(tmp_path, save):
    labels = _objects()
    save(labels, tmp_path / "mask.png")
    read = read_label_map(tmp_path / "mask.png")
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, labels)


def test_read_label_map_refuses_labels_above_255_and_foreign_colours(tmp_path):
    wide = _objects().astype(np.uint16)
    wide[0, 0] = 300
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with pytest.raises(InputError) as error:
        read_label_map(tmp_path / "wide.png")
    assert_input_error(error, tmp_path / "wide.png", "must lie in 0..255", "300")
    colours = PALETTE[_objects()]
    colours[0, 0] = (1, 2, 3)
    Image.fromarray(colours).save(tmp_path / "foreign.png")
    with pytest.raises(InputError) as error:
        read_label_map(tmp_path / "foreign.png")
    assert_input_error(error, tmp_path / "foreign.png", "outside the DAVIS palette")


def test_training_and_validation_read_colour_masks_like_read_label_map(tmp_path):
    """ClipDataset (training) and SequenceDataset (validation) see a DAVIS colour mask as read_label_map does."""
    root = tmp_path / "tinydavis"
    (root / "JPEGImages" / "seq").mkdir(parents=True)
    (root / "Annotations" / "seq").mkdir(parents=True)
    for t in range(3):
        labels = np.roll(_objects([1, 2]), 2 * t, axis=1)
        frame = np.where(labels[..., None] > 0, PALETTE[labels], 60).astype(np.uint8)
        Image.fromarray(frame).save(root / "JPEGImages" / "seq" / f"{t:05d}.jpg", quality=95)
        Image.fromarray(PALETTE[labels]).save(root / "Annotations" / "seq" / f"{t:05d}.png")
    (seq,) = list_sequences([str(root)])
    expected = np.stack([read_label_map(m) for m in seq.masks])
    assert sorted(np.unique(expected)) == [0, 1, 2]

    validation = SequenceDataset([seq])[0]["label"]
    np.testing.assert_array_equal(validation.numpy(), expected[None])

    clip = ClipDataset([seq], num_frames=3, crop_size=64, samples_per_epoch=1)[0]  # no transforms: resize, crop
    got, read = clip["label"][:, 0].numpy(), expected[clip["frame_index"].numpy()]
    # ClipDataset numbers the objects it keeps 1..K in a random order: the same regions, maybe other numbers
    pairs = set(zip(read.ravel().tolist(), got.ravel().tolist()))
    mapping = dict(pairs)
    assert len(pairs) == len(mapping) == 3
    assert mapping[0] == 0 and sorted(mapping.values()) == [0, 1, 2]


# ---------------------------------------------------------------- writers


def test_label_series_writer_keeps_the_input_geometry(clip_files, echo_clip, tmp_path):
    info = open_video(clip_files["nifti"]).info
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", info) as writer:
        for t in reversed(range(info.num_frames)):
            writer.write(t, echo_clip[1][t])
    np.testing.assert_array_equal(read_label_series(tmp_path / "labels.nii.gz"), echo_clip[1])
    written = open_video(tmp_path / "labels.nii.gz").info
    np.testing.assert_array_equal(written.affine, info.affine)
    assert (written.spacing, written.fps, written.num_frames) == (info.spacing, info.fps, info.num_frames)
    assert nib.load(tmp_path / "labels.nii.gz").get_data_dtype() == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]  # the memmap buffer is gone


def test_label_series_writer_refuses_missing_frames(clip_files, tmp_path):
    writer = LabelSeriesWriter(tmp_path / "labels.nii", open_video(clip_files["frames"]).info)
    writer.write(0, np.ones((64, 80), np.uint8))
    with pytest.raises(ValueError, match="7 frames were never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_png_labels_are_exact(echo_clip, tmp_path):
    for t in (0, 7):
        path = write_png_labels(tmp_path, t, echo_clip[1][t])
        with Image.open(path) as image:
            assert path.name == f"0000{t}.png" and image.mode == "L"
    np.testing.assert_array_equal(read_label_series(tmp_path), echo_clip[1][[0, 7]])


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_overlay_has_one_frame_per_input_frame(clip_files, echo_clip, tmp_path, suffix):
    source = open_video(clip_files["frames"])
    write_overlay(tmp_path / f"overlay{suffix}", source, echo_clip[1])
    if suffix == ".mp4":
        assert len(open_video(tmp_path / "overlay.mp4")) == len(source)
    else:
        with Image.open(tmp_path / "overlay.gif") as gif:
            assert gif.n_frames == len(source)
            gif.seek(5)
            frame = np.asarray(gif.convert("RGB"))
        cavity = echo_clip[1][5] == 1
        assert frame[cavity][:, 0].mean() > source[5][cavity][:, 0].mean() + 20  # tinted red (label 1)


# ---------------------------------------------------------------- bad inputs: named file and problem, no output


def test_missing_video(tmp_path, clip_labels_png):
    with pytest.raises(InputError) as error:
        run_pipeline(tmp_path / "absent.mp4", [clip_labels_png], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "absent.mp4", "no such file")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("name", ["noise.mp4", "noise.avi", "noise.nii.gz", "noise.dcm"])
def test_unreadable_file(tmp_path, clip_labels_png, name):
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(InputError) as error:
        run_pipeline(tmp_path / name, [clip_labels_png], None, tmp_path / "out")
    assert_input_error(error, tmp_path / name, "unreadable")
    assert_nothing_written(tmp_path / "out")


def test_truncated_video(clip_files, tmp_path, clip_labels_png):
    data = clip_files["mp4"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as error:
        run_pipeline(tmp_path / "cut.mp4", [clip_labels_png], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "cut.mp4", "truncated")
    assert_nothing_written(tmp_path / "out")


def test_zero_frames(tmp_path, clip_labels_png):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as error:
        run_pipeline(tmp_path / "empty", [clip_labels_png], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "empty", "zero frames")
    assert_nothing_written(tmp_path / "out")


def test_mask_size_differs_from_frames(clip_files, tmp_path):
    Image.fromarray(np.ones((32, 40), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InputError) as error:
        run_pipeline(clip_files["frames"], [tmp_path / "small.png"], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "small.png", "32×40", "64×80")
    assert_nothing_written(tmp_path / "out")


def test_mask_without_foreground(clip_files, tmp_path):
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError) as error:
        run_pipeline(clip_files["frames"], [tmp_path / "empty.png"], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "empty.png", "no foreground")
    assert_nothing_written(tmp_path / "out")


def _float_nifti(path: Path) -> None:
    write_nifti_series(path, np.full((1, 64, 80), 0.5, np.float32))


def _png16(path: Path) -> None:
    Image.fromarray(np.full((64, 80), 300, np.uint16)).save(path)


@pytest.mark.parametrize(
    "name, make, problem",
    [("float.nii.gz", _float_nifti, "must be integers"), ("wide.png", _png16, "must lie in 0..255")],
)
def test_mask_labels_outside_the_allowed_range(clip_files, tmp_path, name, make, problem):
    make(tmp_path / name)
    with pytest.raises(InputError) as error:
        run_pipeline(clip_files["frames"], [tmp_path / name], None, tmp_path / "out")
    assert_input_error(error, tmp_path / name, problem)
    assert_nothing_written(tmp_path / "out")


def test_annotated_frame_out_of_range(clip_files, tmp_path, clip_labels_png):
    with pytest.raises(InputError) as error:
        run_pipeline(clip_files["frames"], [clip_labels_png], [8], tmp_path / "out")
    assert_input_error(error, clip_labels_png, "frame 8 is out of range", "0..7")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("shape", [(80, 64, 3, 4), (80, 64, 1, 4, 2)], ids=["3D+t", "5D"])
def test_nifti_that_is_not_2d_plus_t(tmp_path, clip_labels_png, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)), tmp_path / "volume.nii.gz")
    with pytest.raises(InputError) as error:
        run_pipeline(tmp_path / "volume.nii.gz", [clip_labels_png], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "volume.nii.gz", "not a 2D+t series")
    assert_nothing_written(tmp_path / "out")


def test_output_directory_with_results(clip_files, tmp_path, clip_labels_png):
    """Only the job's own output name is refused or replaced; the user's other files stay as they are."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    run_pipeline(clip_files["frames"], [clip_labels_png], None, out)  # a folder holding other files is fine
    assert sorted(os.listdir(out)) == ["labels.nii.gz", "notes.txt"]
    (out / "labels.nii.gz").write_bytes(b"previous run")
    with pytest.raises(InputError) as error:
        run_pipeline(clip_files["frames"], [clip_labels_png], None, out)
    assert_input_error(error, out, "already holds results", "labels.nii.gz")
    with pytest.raises(InputError):  # overwrite, but the run fails: the old results stay
        run_pipeline(clip_files["frames"], [tmp_path / "absent.png"], None, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["labels.nii.gz", "notes.txt"]
    assert (out / "labels.nii.gz").read_bytes() == b"previous run"
    run_pipeline(clip_files["frames"], [clip_labels_png], None, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["labels.nii.gz", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert read_label_series(out / "labels.nii.gz").shape == (8, 64, 80)
