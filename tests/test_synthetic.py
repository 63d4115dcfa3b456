"""The SYNTHETIC echocardiography-like clips (scripts.synthetic): deterministic, lazy, with usable ground truth."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from scripts.annotations import read_annotations
from scripts.errors import InputError
from scripts.readers import open_video
from scripts.synthetic import CAVITY, MYOCARDIUM, SyntheticEchoSource, echo_frame, echo_labels, write_echo_dataset


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_frames_are_a_pure_function_of_t_and_seed():
    frame, labels = echo_frame(17, 96, 128, seed=5)
    again, labels_again = echo_frame(17, 96, 128, seed=5)  # no state carried between calls
    np.testing.assert_array_equal(frame, again)
    np.testing.assert_array_equal(labels, labels_again)
    np.testing.assert_array_equal(labels, echo_labels(17, 96, 128, seed=5))
    assert not np.array_equal(frame, echo_frame(17, 96, 128, seed=6)[0])
    assert frame.shape == (96, 128, 3) and frame.dtype == np.uint8 and labels.dtype == np.uint8


def test_labels_are_cavity_inside_myocardium_and_look_like_echo():
    frame, labels = echo_frame(0, 128, 128, seed=1)
    assert set(np.unique(labels)) == {0, CAVITY, MYOCARDIUM}
    cavity = labels == CAVITY
    assert np.isin(
        labels[cv2.dilate(cavity.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0], [CAVITY, MYOCARDIUM]
    ).all()
    grey = frame[..., 0].astype(float)
    assert grey[cavity].mean() + 40 < grey[labels == MYOCARDIUM].mean()  # dark blood pool, bright wall
    assert grey[0, 0] == 0 and grey[0, -1] == 0  # outside the ultrasound fan


@pytest.mark.parametrize("seed", range(4))
def test_motion_is_large_enough_to_be_non_trivial(seed):
    source = SyntheticEchoSource(40, 96, 96, seed=seed)
    first = source.labels(0) == CAVITY
    copy_first_iou = np.mean([iou(first, source.labels(t) == CAVITY) for t in range(1, len(source))])
    assert 0.45 < copy_first_iou < 0.85


def test_source_is_a_lazy_video_source():
    source = SyntheticEchoSource(3000, 64, 64, seed=2)
    assert (source.info.kind, len(source), source.info.fps) == ("synthetic", 3000, 25.0)
    np.testing.assert_array_equal(source[2999], echo_frame(2999, 64, 64, seed=2)[0])
    with pytest.raises(IndexError):
        source[3000]
    with pytest.raises(IndexError):
        source.labels(-1)


def test_dataset_is_davis_layout_and_readable(tmp_path):
    root = write_echo_dataset(tmp_path / "echo", num_sequences=2, num_frames=5, height=48, width=64, seed=1)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["synthetic"] is True and sorted(meta["sequences"]) == ["echo00", "echo01"]
    source = open_video(root / "JPEGImages" / "echo01")
    assert (len(source), source.info.height, source.info.width) == (5, 48, 64)
    masks = sorted((root / "Annotations" / "echo01").glob("*.png"))
    assert [p.name for p in masks] == [f"{t:05d}.png" for t in range(5)]
    annotations = read_annotations(masks, range(5), source.info)
    np.testing.assert_array_equal(annotations[4], echo_labels(4, 48, 64, seed=1001))
    with pytest.raises(InputError, match="already holds results"):  # never mixed into an existing dataset
        write_echo_dataset(root, num_sequences=1, num_frames=2, height=48, width=64, seed=2)
