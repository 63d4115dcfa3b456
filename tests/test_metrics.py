"""The VOS scores against hand-computed cases and against a slow, obviously correct re-implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from scripts.metrics import (
    SequenceScorer,
    aggregate,
    boundary_f,
    boundary_map,
    boundary_radius,
    objects_of,
    score_frame,
)


def region_j(pred: np.ndarray, gt: np.ndarray) -> float:
    """J of two binary masks as evaluation scores it (one object through `score_frame`)."""
    return score_frame((pred != 0).astype(np.uint8), (gt != 0).astype(np.uint8), [1], hd95=False)[1]["J"]


def score_sequence(preds: list[np.ndarray], gts: list[np.ndarray], objects: list[int] | None = None) -> dict:
    """A whole sequence through `SequenceScorer` as evaluation feeds it: frame 0 (the annotation) not scored, the
    objects those of the first ground-truth frame unless given."""
    scorer = SequenceScorer(objects if objects is not None else objects_of(gts[0]))
    for t, (pred, gt) in enumerate(zip(preds, gts)):
        scorer.append(t, pred, gt)
    return scorer.aggregate()


def square(shape=(10, 10), top=2, left=2, size=4) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = 1
    return mask


def naive_boundary(mask: np.ndarray) -> np.ndarray:
    """A pixel differs from its right, lower or lower-right neighbour that lies inside the image."""
    h, w = mask.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0), (1, 1)):
                if y + dy < h and x + dx < w and mask[y, x] != mask[y + dy, x + dx]:
                    out[y, x] = True
    return out


def naive_boundary_f(pred: np.ndarray, gt: np.ndarray) -> float:
    """Boundary F with matches found by brute-force distances (≤ radius) instead of a dilation."""
    radius = math.ceil(0.008 * math.hypot(*gt.shape))
    pb, gb = np.argwhere(naive_boundary(pred)), np.argwhere(naive_boundary(gt))
    if len(pb) == 0 and len(gb) == 0:
        return 1.0
    if len(pb) == 0 or len(gb) == 0:
        return 0.0

    def matched(a, b):
        return sum(any((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= radius**2 for q in b) for p in a)

    precision, recall = matched(pb, gb) / len(pb), matched(gb, pb) / len(gb)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def naive_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    inter = union = 0
    for p, g in zip(pred.ravel() != 0, gt.ravel() != 0):
        inter += p and g
        union += p or g
    return 1.0 if union == 0 else inter / union


def test_shifted_square_by_hand():
    a, b = square(), square(left=3)
    # 4×4 squares one column apart: 12 pixels shared, 20 covered.
    assert region_j(a, b) == pytest.approx(12 / 20)
    scores = score_sequence([a, b], [a, a])["objects"][1]["frames"][0]
    assert scores["J"] == pytest.approx(0.6)
    assert scores["Dice"] == pytest.approx(2 * 12 / 32)
    # Boundaries one pixel apart are well inside the radius (ceil(0.008 × 14.1) = 1 pixel).
    assert scores["F"] == pytest.approx(1.0)
    assert scores["J&F"] == pytest.approx(0.8)
    assert scores["HD95"] == pytest.approx(1.0)


def test_object_touching_the_image_edge_has_no_boundary_there():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :5] = 1  # left half: touches the top, bottom and left edges
    expected = np.zeros((10, 10), bool)
    expected[:, 4] = True  # only the column facing the background
    np.testing.assert_array_equal(boundary_map(mask), expected)
    full = np.ones((10, 10), np.uint8)
    assert not boundary_map(full).any()


def test_boundary_radius_from_the_diagonal():
    assert boundary_radius((288, 384)) == 4  # diagonal 480: 0.008 × 480 = 3.84 → 4
    assert boundary_radius((512, 512)) == 6  # diagonal 724.1 → 5.79 → 6
    pred = np.zeros((288, 384), np.uint8)
    pred[:, :100] = 1  # boundary at column 99
    gt_in, gt_out = np.zeros_like(pred), np.zeros_like(pred)
    gt_in[:, :104] = 1  # boundary 4 pixels away: matched
    gt_out[:, :105] = 1  # 5 pixels away: not matched
    assert boundary_f(pred, gt_in) == pytest.approx(1.0)
    assert boundary_f(pred, gt_out) == pytest.approx(0.0)


def test_empty_masks():
    empty, obj = np.zeros((10, 10), np.uint8), square()
    assert region_j(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert region_j(empty, obj) == 0.0 and boundary_f(empty, obj) == 0.0
    assert region_j(obj, empty) == 0.0 and boundary_f(obj, empty) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_naive_implementation(seed):
    rng = np.random.default_rng(seed)
    shape = (40, 50)
    pred = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    gt = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    assert region_j(pred, gt) == pytest.approx(naive_iou(pred, gt))
    assert boundary_f(pred, gt) == pytest.approx(naive_boundary_f(pred, gt))
    np.testing.assert_array_equal(boundary_map(pred), naive_boundary(pred))


def test_score_sequence_conventions():
    a, b = square(), square(left=3)
    two = a.copy()
    two[7:9, 7:9] = 2
    gts = [two, two, a]  # object 2 vanishes in frame 2
    preds = [two, a, b]  # object 2 is missed in frame 1 and correctly absent in frame 2
    result = score_sequence(preds, gts)
    objects = result["objects"]
    assert sorted(objects) == [1, 2]
    assert [f["frame"] for f in objects[1]["frames"]] == [1, 2]  # the annotated frame 0 is not scored
    missed, absent = objects[2]["frames"]
    assert missed["J"] == 0 and missed["F"] == 0 and missed["Dice"] == 0 and math.isnan(missed["HD95"])
    assert absent["J"] == 1 and absent["F"] == 1 and absent["Dice"] == 1 and absent["HD95"] == 0
    assert objects[2]["HD95"] == 0  # NaN frames are left out of the mean
    assert objects[1]["J"] == pytest.approx((1 + 0.6) / 2)
    assert result["J"] == pytest.approx((objects[1]["J"] + objects[2]["J"]) / 2)
    assert list(score_sequence(preds, gts, objects=[2])["objects"]) == [2]


def test_aggregate_is_mean_over_objects():
    a = square()
    two = a.copy()
    two[7:9, 7:9] = 2
    seq_two = score_sequence([two, two], [two, two])  # two perfect objects
    seq_one = score_sequence([a, np.zeros_like(a)], [a, a])  # one missed object
    result = aggregate({"s1": seq_two, "s2": seq_one})
    assert result["num_objects"] == 3 and result["num_sequences"] == 2
    assert result["J"] == pytest.approx(2 / 3)  # not the mean over sequences (0.5)
    assert result["HD95"] == pytest.approx(0.0)  # the missed object's HD95 is undefined and left out


def test_lost_counts_frames_showing_the_object_where_the_prediction_lost_it() -> None:
    """Lost: 1 where the truth shows the object and the prediction is empty or barely overlaps (J < 0.1), 0 where it
    is found, not counted where the truth does not show it; the object's value is the fraction."""
    obj = np.zeros((40, 40), np.uint8)
    obj[10:30, 10:30] = 1
    sliver = np.zeros_like(obj)
    sliver[10:30, 10:11] = 1  # J = 20 / 400 < 0.1: lost although not empty
    empty = np.zeros_like(obj)
    result = score_sequence([obj, obj, empty, sliver, empty], [obj, obj, obj, obj, empty])
    lost = [f["Lost"] for f in result["objects"][1]["frames"]]
    assert lost[:3] == [0.0, 1.0, 1.0] and np.isnan(lost[3])
    assert result["objects"][1]["Lost"] == pytest.approx(2 / 3) and result["Lost"] == pytest.approx(2 / 3)
    assert aggregate({"s": result})["Lost"] == pytest.approx(2 / 3)
