"""Reading videos and series (scripts.readers): round trips of every input format, geometry, DICOM spacing, and the
one-line errors for inputs that cannot be read."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from conftest import (
    AFFINE,
    SAMPLE_SEQUENCE,
    assert_input_error,
    assert_nothing_written,
    mae,
    run_pipeline,
    write_nifti_series,
)
from PIL import Image

from scripts.annotations import read_annotations
from scripts.errors import InputError
from scripts.outputs import LabelSeriesWriter
from scripts.overlay import VIDEO_ROUND_TRIP_MAE, write_video
from scripts.readers import open_video


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


@pytest.mark.parametrize("shape", [(80, 64, 3, 4), (80, 64, 1, 4, 2)], ids=["3D+t", "5D"])
def test_nifti_that_is_not_2d_plus_t(tmp_path, clip_labels_png, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)), tmp_path / "volume.nii.gz")
    with pytest.raises(InputError) as error:
        run_pipeline(tmp_path / "volume.nii.gz", [clip_labels_png], None, tmp_path / "out")
    assert_input_error(error, tmp_path / "volume.nii.gz", "not a 2D+t series")
    assert_nothing_written(tmp_path / "out")
