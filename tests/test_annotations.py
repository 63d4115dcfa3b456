"""Reading annotations and label maps (scripts.annotations): PNG and NIfTI masks, the DAVIS palette, the label
range, and the one-line errors for masks that do not fit their video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_input_error, assert_nothing_written, run_pipeline, write_nifti_series
from PIL import Image

from scripts.annotations import read_annotations, read_label_map
from scripts.data import ClipDataset, list_sequences
from scripts.errors import InputError
from scripts.overlay import PALETTE
from scripts.readers import open_video
from scripts.validation import SequenceDataset


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
