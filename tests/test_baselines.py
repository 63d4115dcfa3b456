"""Baseline propagators: order and coverage of the interface, and that flow actually tracks motion."""

import numpy as np
import pytest
from scipy import ndimage

from scripts.baselines import CopyFirstFrame, FarnebackFlow
from scripts.metrics import score_frame

SIZE = 24


def moving_square(num_frames: int = 8, step=(2, 3)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A textured square gliding over a static, mildly textured background."""
    rng = np.random.default_rng(0)
    background = ndimage.gaussian_filter(rng.random((96, 96)) * 40 + 60, 1).astype(np.uint8)
    texture = np.maximum(ndimage.gaussian_filter(rng.random((SIZE, SIZE)) * 255, 0.7), 150).astype(np.uint8)
    frames, labels = [], []
    for t in range(num_frames):
        y, x = 20 + step[0] * t, 16 + step[1] * t
        frame, label = background.copy(), np.zeros((96, 96), np.uint8)
        frame[y : y + SIZE, x : x + SIZE] = texture
        label[y : y + SIZE, x : x + SIZE] = 1
        frames.append(np.repeat(frame[..., None], 3, axis=2))
        labels.append(label)
    return frames, labels


@pytest.mark.parametrize("method", [CopyFirstFrame(), FarnebackFlow()])
def test_every_frame_once_forward_then_backward(method):
    frames, labels = moving_square(7)
    out = list(method.propagate(frames, {3: labels[3]}))
    assert [t for t, _ in out] == [3, 4, 5, 6, 2, 1, 0]
    assert out[0][1] is labels[3]
    assert all(m.shape == (96, 96) and m.dtype == np.uint8 for _, m in out)


def test_copy_yields_the_annotation_everywhere():
    frames, labels = moving_square(5)
    for _, m in CopyFirstFrame().propagate(frames, {0: labels[0]}):
        np.testing.assert_array_equal(m, labels[0])


@pytest.mark.parametrize("method", [CopyFirstFrame(), FarnebackFlow()])
def test_each_annotated_frame_resets_the_propagation(method):
    frames, labels = moving_square(7)
    a, b = np.full((96, 96), 1, np.uint8), np.full((96, 96), 2, np.uint8)  # uniform maps survive any warp
    out = dict(method.propagate(frames, {2: a, 4: b}))
    assert sorted(out) == list(range(7))
    assert [int(out[t][0, 0]) for t in range(7)] == [1, 1, 1, 1, 2, 2, 2]


def test_flow_tracks_a_translating_square_better_than_copy():
    frames, labels = moving_square(8)
    j = {}
    for name, method in (("copy", CopyFirstFrame()), ("flow", FarnebackFlow())):
        out = dict(method.propagate(frames, {0: labels[0]}))
        j[name] = np.mean([score_frame(out[t], labels[t], [1], hd95=False)[1]["J"] for t in range(1, 8)])
    assert j["flow"] > 0.9
    assert j["flow"] > j["copy"] + 0.4


def test_no_annotation_is_an_error():
    frames, _ = moving_square(3)
    with pytest.raises(ValueError, match="annotated"):
        list(CopyFirstFrame().propagate(frames, {}))
    with pytest.raises(ValueError, match="outside"):
        list(CopyFirstFrame().propagate(frames, {5: np.zeros((96, 96), np.uint8)}))
