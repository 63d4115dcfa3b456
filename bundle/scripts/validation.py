"""Training-time validation: whole sequences as evaluator batches, and J&F as an Ignite metric.

MONAI's `SupervisedEvaluator` runs the propagation inferer on each sequence; `JandF` scores its argmax labels the
way `evaluate.json` does (frame 0 excluded, mean over objects), with J and the DAVIS boundary F only (HD95 is slow
and not used for model selection).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch
import torch.nn.functional as F
from ignite.metrics import Metric

from scripts.annotations import read_label_map
from scripts.davis import Sequence
from scripts.inferer import short_side_shape
from scripts.metrics import SequenceScorer, objects_of
from scripts.readers import read_rgb


class SequenceDataset(torch.utils.data.Dataset):
    """Each item is one whole sequence: image 3×T×H×W in [0, 1] and label 1×T×H×W, short side resized to `size`."""

    def __init__(self, sequences: Seq[Sequence], size: int | None = None) -> None:
        self.sequences = list(sequences)
        self.size = size

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        seq = self.sequences[index]
        image = torch.from_numpy(np.stack([read_rgb(p) for p in seq.frames]))
        label = torch.from_numpy(np.stack([read_label_map(p) for p in seq.masks]).astype(np.int64))
        image = image.permute(3, 0, 1, 2).float() / 255  # 3×T×H×W
        label = label[None]  # 1×T×H×W
        if self.size is not None:
            shape = short_side_shape(*image.shape[-2:], self.size)
            image = F.interpolate(image.transpose(0, 1), size=shape, mode="bilinear", antialias=True).transpose(0, 1)
            label = F.interpolate(label.transpose(0, 1).float(), size=shape, mode="nearest").long().transpose(0, 1)
        return {"image": image, "label": label, "name": seq.key}


def prepare_sequence_batch(batchdata: dict, device: torch.device, non_blocking: bool = False, **kwargs):
    """Evaluator input B×4×T×H×W (frames + label maps; the inferer uses frame 0's) and target label B×1×T×H×W."""
    image, label = batchdata["image"], batchdata["label"]
    inputs = torch.cat([image, label.float()], dim=1).to(device, non_blocking=non_blocking)
    return inputs, label.to(device, non_blocking=non_blocking)


class JandF(Metric):
    """Mean J&F over all objects of all validated sequences (the dataset score of `metrics.aggregate`), scored by
    `metrics.SequenceScorer` as `evaluate.json` scores (frame 0 excluded, objects of frame 0), without HD95."""

    def reset(self) -> None:
        self._scores: list[float] = []

    def update(self, output: tuple) -> None:
        preds, labels = output
        scorer = SequenceScorer(hd95=False)
        for pred, label in zip(preds, labels):
            pred, label = np.asarray(pred[0].cpu()), np.asarray(label[0].cpu())  # T×H×W each
            scorer.reset(objects_of(label[0]))
            for t in range(len(label)):
                scorer.append(t, pred[t], label[t])
            self._scores += [o["J&F"] for o in scorer.aggregate()["objects"].values()]

    def compute(self) -> float:
        return float(np.mean(self._scores)) if self._scores else 0.0
