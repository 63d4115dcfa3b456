"""Temporal contrastive loss on memory values; the segmentation loss comes from MONAI (`DiceCELoss`).

Each memory value (one object in one frame, B×K×Cv×h×w) is pooled over the object's mask into an embedding
z = normalise(Σ m·v / Σ m). For an anchor i, positives P(i) are the same object in frames at most `pos_gap` frames
away (gap in original frame indices), negatives N(i) are the same object at least `neg_gap` frames away and every
other object or clip in the batch. With similarity s = z_i·z_j / τ the loss is the InfoNCE

    L = mean over (i, p ∈ P(i)) of  −log( exp(s_ip) / (exp(s_ip) + Σ_{n ∈ N(i)} exp(s_in)) ),

so temporally adjacent frames are pulled together and distant frames and other objects pushed apart. Frames with a
gap strictly between `pos_gap` and `neg_gap` are neither. Anchors without positives or negatives do not contribute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_embeddings(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted average of values B×T×K×Cv×h×w over masks B×T×K×H×W → unit embeddings B×T×K×Cv."""
    b, t, k, cv, h, w = values.shape
    m = F.adaptive_avg_pool2d(masks.flatten(0, 2)[:, None], (h, w)).reshape(b, t, k, 1, h * w)
    pooled = (values.flatten(4) * m).sum(-1) / m.sum(-1).clamp(min=1e-6)
    return F.normalize(pooled, dim=-1)


class TemporalContrastiveLoss(torch.nn.Module):
    """InfoNCE over memory embeddings with frame-gap-defined positives and negatives (see module docstring)."""

    def __init__(self, temperature: float = 0.1, pos_gap: int = 3, neg_gap: int = 8) -> None:
        super().__init__()
        if not 0 < pos_gap < neg_gap:
            raise ValueError(f"need 0 < pos_gap < neg_gap, got pos_gap={pos_gap}, neg_gap={neg_gap}")
        self.temperature = temperature
        self.pos_gap = pos_gap
        self.neg_gap = neg_gap

    def forward(self, embeddings: torch.Tensor, frame_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """embeddings B×T×K×C (unit), frame_index B×T, valid B×K (objects present) → scalar loss."""
        b, t, k, c = embeddings.shape
        z = embeddings.permute(0, 2, 1, 3).reshape(-1, c)  # (B·K·T)×C, ordered clip, object, frame
        clip = torch.arange(b, device=z.device).repeat_interleave(k * t)
        obj = torch.arange(k, device=z.device).repeat_interleave(t).repeat(b)
        frame = frame_index[:, None, :].expand(b, k, t).reshape(-1)
        keep = valid[:, :, None].expand(b, k, t).reshape(-1).bool()

        same = (clip[:, None] == clip[None]) & (obj[:, None] == obj[None])
        gap = (frame[:, None] - frame[None]).abs()
        pair_ok = keep[:, None] & keep[None] & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
        pos = same & (gap <= self.pos_gap) & pair_ok
        neg = ((~same) | (gap >= self.neg_gap)) & pair_ok

        sim = z @ z.t() / self.temperature
        neg_lse = torch.logsumexp(sim.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)  # (B·K·T)×1
        usable = pos & torch.isfinite(neg_lse)
        if not usable.any():
            return sim.sum() * 0.0
        # −log(e^{s_ip} / (e^{s_ip} + Σ_n e^{s_in})) = logaddexp(s_ip, lse_n) − s_ip
        loss = torch.logaddexp(sim, neg_lse.expand_as(sim)) - sim
        return loss[usable].mean()
