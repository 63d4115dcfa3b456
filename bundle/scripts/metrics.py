"""Video object segmentation scores: the DAVIS boundary F-measure (which MONAI lacks) and a thin wrapper over MONAI's
Dice, IoU and HD95, with the per-frame / per-object / per-dataset bookkeeping the DAVIS protocol prescribes.

Conventions (shared by every score this module returns):
- An empty prediction on an empty truth is perfect: J = F = Dice = 1, HD95 = 0.
- HD95 against an empty mask on only one side is undefined: NaN, left out of every mean (``null`` in JSON).
- ``Lost`` is 1 on a frame where the truth shows the object and the prediction is empty or overlaps it with
  J < ``LOST_IOU``, 0 where it does not, NaN (not counted) where the truth does not show the object; so an object's
  ``Lost`` is the fraction of the frames showing it in which the method lost it (the failure mode of losing the
  object on unseen videos).
- The first frame of a sequence is the annotation given to the method and is never scored; in evaluation each
  object starts on the first frame that annotates it (as in DAVIS 2017), which and every earlier frame are not
  scored for it.
- A dataset's score is the mean over all objects of all its sequences; an object's score is the mean over its frames.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import cv2
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

SCORES = ("J&F", "J", "F", "Dice", "HD95", "Lost")
LOST_IOU = 0.1  # an object shown in the truth is lost where the prediction overlaps it less than this (J)
BOUNDARY_TOLERANCE = 0.008  # DAVIS: boundary match radius as a fraction of the image diagonal

_DICE = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
_IOU = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
_HD95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """DAVIS ``seg2bmap``: a pixel is on the boundary where it differs from its right, lower or lower-right neighbour
    inside the image, so an object touching the image edge has no boundary along that edge."""
    m = np.asarray(mask, dtype=bool)
    b = np.zeros_like(m)
    b[:, :-1] |= m[:, :-1] != m[:, 1:]
    b[:-1, :] |= m[:-1, :] != m[1:, :]
    b[:-1, :-1] |= m[:-1, :-1] != m[1:, 1:]
    return b


def boundary_radius(shape: Sequence[int]) -> int:
    """Match radius in pixels: ``ceil(0.008 × diagonal)`` as in the DAVIS evaluation."""
    return int(math.ceil(BOUNDARY_TOLERANCE * math.hypot(shape[0], shape[1])))


def _disk(radius: int) -> np.ndarray:
    """The structuring element of ``skimage.morphology.disk``, so matches agree with the DAVIS toolkit."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def boundary_f(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS boundary F-measure of two binary H×W masks (1 when both boundaries are empty, 0 when only one is)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    disk = _disk(boundary_radius(gt.shape))
    gt_zone = cv2.dilate(gt_b.astype(np.uint8), disk).astype(bool)
    pred_zone = cv2.dilate(pred_b.astype(np.uint8), disk).astype(bool)
    precision = np.count_nonzero(pred_b & gt_zone) / n_pred
    recall = np.count_nonzero(gt_b & pred_zone) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _monai_scores(pred: np.ndarray, gt: np.ndarray, hd95: bool = True) -> dict[str, np.ndarray]:
    """J, Dice and (with `hd95`) HD95 per channel of binary C×H×W stacks, via MONAI on 1×C×H×W tensors, with this
    module's conventions for empty masks (MONAI returns NaN for HD95 whenever a side is empty)."""
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float64))[None]
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float64))[None]
    with _single_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask; the convention below handles them
        scores = {"J": _IOU(p, g)[0].numpy().astype(float), "Dice": _DICE(p, g)[0].numpy().astype(float)}
        if not hd95:
            return scores
        distance = _HD95(p, g)[0].numpy().astype(float)
    pred_any, gt_any = pred.reshape(len(pred), -1).any(1), gt.reshape(len(gt), -1).any(1)
    distance[~pred_any & ~gt_any] = 0.0
    distance[pred_any != gt_any] = np.nan
    return {**scores, "HD95": distance}


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: on single-frame masks, thread start-up and sync cost more than the work (MONAI's
    HD95 ran several times slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def score_frame(
    pred: np.ndarray, gt: np.ndarray, objects: Iterable[int], hd95: bool = True
) -> dict[int, dict[str, float]]:
    """J, F, J&F, Dice, (with `hd95`, the slow one) HD95 and Lost of each object in one H×W label-map pair."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    objects = list(objects)
    pred_1h = np.stack([pred == k for k in objects])
    gt_1h = np.stack([gt == k for k in objects])
    monai_scores = _monai_scores(pred_1h, gt_1h, hd95)
    scores = {}
    for i, k in enumerate(objects):
        j, f = monai_scores["J"][i], boundary_f(pred_1h[i], gt_1h[i])
        scores[k] = {"J&F": float((j + f) / 2), "J": float(j), "F": float(f)}
        scores[k].update({name: float(v[i]) for name, v in monai_scores.items() if name != "J"})
        scores[k]["Lost"] = float(j < LOST_IOU) if gt_1h[i].any() else float("nan")
    return scores


class SequenceScorer:
    """Scores of one sequence, fed frame by frame: `reset` / `append` / `aggregate`, as MONAI's cumulative metrics.

    The one per-object, per-frame scoring loop: evaluation and training-time validation both score through it.
    Frames in `skip_frames` (the annotation given to the method, frame 0 by default) are not scored;
    with `starts` (object → the frame that first annotates it) an object is scored only on the frames after its own.
    `hd95=False` leaves out HD95, the slow score, where only J&F is wanted (validation).
    """

    def __init__(
        self,
        objects: Iterable[int] = (),
        skip_frames: Iterable[int] = (0,),
        hd95: bool = True,
        starts: Mapping[int, int] | None = None,
    ) -> None:
        self.skip_frames = set(skip_frames)
        self.hd95 = hd95
        self.reset(objects, starts)

    def reset(self, objects: Iterable[int], starts: Mapping[int, int] | None = None) -> None:
        """Start a sequence whose objects (label values) are `objects`, each first annotated on `starts[k]`."""
        self.frames: dict[int, list[dict[str, float]]] = {int(k): [] for k in objects}
        self.starts = {int(k): int(f) for k, f in (starts or {}).items()}

    def append(self, t: int, pred: np.ndarray, gt: np.ndarray, objects: Iterable[int] | None = None) -> None:
        """Score frame `t` (H×W predicted and true label maps), in any order, for `objects` (default: all)."""
        if t in self.skip_frames:
            return
        objects = [k for k in (self.frames if objects is None else objects) if t > self.starts.get(k, -1)]
        if not objects:
            return
        for k, scores in score_frame(pred, gt, objects, self.hd95).items():
            self.frames[k].append({"frame": t, **scores})

    def aggregate(self) -> dict:
        """Per-object means over frames (with each frame's scores, in frame order) and the mean over objects."""
        for scores in self.frames.values():
            scores.sort(key=lambda s: s["frame"])
        first = {k: {"first_frame": self.starts[k]} if k in self.starts else {} for k in self.frames}
        objects = {k: {**_mean(f), **first[k], "frames": f} for k, f in self.frames.items()}
        return {**_mean(objects.values()), "num_objects": len(objects), "objects": objects}


def objects_of(labels: np.ndarray) -> list[int]:
    """The object labels (non-zero values) of a label map."""
    return [int(k) for k in np.unique(labels) if k != 0]


def aggregate(per_sequence: dict) -> dict:
    """Dataset scores from ``{sequence: SequenceScorer.aggregate()}``: the mean over all objects of all sequences."""
    objects = [o for s in per_sequence.values() for o in s["objects"].values()]
    return {**_mean(objects), "num_sequences": len(per_sequence), "num_objects": len(objects)}


def _mean(items: Iterable[dict]) -> dict[str, float]:
    """Mean of each score over ``items``, skipping NaN (undefined HD95); NaN when nothing is defined. Scores missing
    from the items (HD95 left out) are missing from the means too."""
    items = list(items)
    means = {}
    for name in (n for n in SCORES if not items or n in items[0]):
        values = np.array([i[name] for i in items], dtype=float)
        values = values[~np.isnan(values)]
        means[name] = float(values.mean()) if values.size else float("nan")
    return means
