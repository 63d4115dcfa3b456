"""Training-free propagators that any learned model must beat, with the model's ``propagate`` interface so the same
evaluation scores them: copy the annotation unchanged, or carry it along dense optical flow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # only len() and source[t] are used, so any frame sequence will do
    from scripts.readers import VideoSource


def propagation_order(num_frames: int, annotated: list[int]) -> list[tuple[int, int | None]]:
    """``(t, previous t)`` in propagation order: forward from the first annotated frame to the end, then backward from
    it to frame 0; ``previous`` is None where the frame is annotated and the propagation restarts from it."""
    if not annotated:
        raise ValueError("at least one annotated frame is needed")
    bad = [t for t in annotated if not 0 <= t < num_frames]
    if bad:
        raise ValueError(f"annotated frames {bad} outside the video's {num_frames} frames")
    first = min(annotated)
    marked = set(annotated)
    forward = [(t, None if t in marked else t - 1) for t in range(first, num_frames)]
    backward = [(t, t + 1) for t in range(first - 1, -1, -1)]
    return forward + backward


class CopyFirstFrame:
    """Every frame gets the nearest preceding annotation in propagation direction: the score of doing nothing."""

    def propagate(self, source: VideoSource, annotations: dict[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(t, label map)`` for every frame once, without reading a single frame."""
        labels, last = None, None
        for t, previous in propagation_order(len(source), list(annotations)):
            if previous is None:
                labels = annotations[t]
            elif previous != last:  # the backward pass restarts from the first annotated frame
                labels = annotations[previous]
            last = t
            yield t, labels


class FarnebackFlow:
    """Warp the previous label map into each frame along OpenCV's dense Farneback flow; the classical tracker.

    The flow is computed from the current frame to the previous one (backward flow), so every pixel of the current
    frame looks up one label (nearest neighbour) and no holes open. Only two frames are held at a time.
    Defaults favour large motion (5 pyramid levels, wide window) because the datasets are sub-sampled in time.
    """

    def __init__(
        self,
        pyr_scale: float = 0.5,
        levels: int = 5,
        winsize: int = 21,
        iterations: int = 3,
        poly_n: int = 7,
        poly_sigma: float = 1.5,
    ) -> None:
        self.params = dict(
            pyr_scale=pyr_scale,
            levels=levels,
            winsize=winsize,
            iterations=iterations,
            poly_n=poly_n,
            poly_sigma=poly_sigma,
            flags=0,
        )

    def warp(self, labels: np.ndarray, grey_previous: np.ndarray, grey_current: np.ndarray) -> np.ndarray:
        """Label map of the current frame: each pixel takes the label where the backward flow points to."""
        flow = cv2.calcOpticalFlowFarneback(grey_current, grey_previous, None, **self.params)
        h, w = labels.shape
        grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        return cv2.remap(
            labels, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
        )

    def propagate(self, source: VideoSource, annotations: dict[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(t, label map)`` for every frame once, forward then backward from the first annotated frame."""
        labels, grey, last = None, None, None
        for t, previous in propagation_order(len(source), list(annotations)):
            current = _grey(source[t])
            if previous is None:
                labels = annotations[t]
            else:
                if previous != last:  # the backward pass restarts from the first annotated frame
                    labels, grey = annotations[previous], _grey(source[previous])
                labels = self.warp(labels, grey, current)
            grey, last = current, t
            yield t, labels


def _grey(frame: np.ndarray) -> np.ndarray:
    """Grey level of an H×W×3 uint8 RGB frame, the input Farneback expects."""
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
