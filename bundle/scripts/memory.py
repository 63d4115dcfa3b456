"""The memory: affinity between query and memory keys, softmax (or top-k) readout of memory values, and the bank.

Kept apart from the network so bounded storage and eviction live in one place (as in XMem/Cutie's memory manager).
Training builds its memory as plain tensors and calls the same `read` as inference; inference stores frames in a
`MemoryBank`, which the configs declare (`memory` in `inference.json`), so a new eviction rule is one subclass that
overrides `evict` and one config line.
"""

from __future__ import annotations

import math

import torch

# Affinities beyond this magnitude only produce exp() underflow into denormal floats, which are very slow on x86.
AFFINITY_CLAMP = 50.0


def affinity(mem_key: torch.Tensor, query_key: torch.Tensor, clamp: float = AFFINITY_CLAMP) -> torch.Tensor:
    """Scaled negative squared L2 distance (STCN), B×N×M for memory keys B×C×N and query keys B×C×M.

    The query's own ||q||² is constant over memory positions, so it cancels in the softmax and is left out.
    Computed in float32 even under autocast: in float16 the difference of two large terms loses the affinity.
    """
    c = mem_key.shape[1]
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):  # constants: TorchScript
        mem_key, query_key = mem_key.float(), query_key.float()
        mem_sq = mem_key.pow(2).sum(1).unsqueeze(2)  # B×N×1
        cross = mem_key.transpose(1, 2) @ query_key  # B×N×M
        return ((2 * cross - mem_sq) / math.sqrt(c)).clamp(min=-clamp)


def softmax_weights(aff: torch.Tensor) -> torch.Tensor:
    """Softmax over memory positions (dim 1), shifted by the maximum for stability."""
    return torch.softmax(aff - aff.amax(dim=1, keepdim=True), dim=1)


def read(
    mem_key: torch.Tensor, mem_value: torch.Tensor, query_key: torch.Tensor, top_k: int | None = None
) -> torch.Tensor:
    """Readout B×K×Cv×M: memory values B×K×Cv×N weighted by the softmax affinity to query keys B×Ck×M.

    With top_k < N only the k best memory positions of each query take part, gathered and summed, so the readout
    costs k·M instead of N·M value reads. Without top_k (training, where gradients need every position) or when
    k covers the memory, the read is the dense softmax.
    """
    aff = affinity(mem_key, query_key)  # B×N×M
    b, k, cv, n = mem_value.shape
    values = mem_value.reshape(b, k * cv, n)
    if top_k is None or top_k >= n:
        return (values @ softmax_weights(aff)).reshape(b, k, cv, -1)
    top, indices = torch.topk(aff, k=top_k, dim=1)  # B×k×M
    weights = torch.softmax(top - top[:, :1], dim=1)
    m = indices.shape[2]
    gathered = torch.gather(values.transpose(1, 2), 1, indices.reshape(b, -1, 1).expand(-1, -1, k * cv))
    out = (gathered.reshape(b, top_k, m, k * cv) * weights[..., None]).sum(1)  # B×M×(K·Cv)
    return out.transpose(1, 2).reshape(b, k, cv, m)


class MemoryBank:
    """One video's inference memory: pinned frames (annotations) plus at most `mem_size` working frames.

    The bank owns its capacity: `write` stores a frame and calls `evict`, which drops the oldest working frames
    (override it for another rule), so peak memory stays flat whatever the video length. Each entry holds one frame's
    key (B×Ck×h×w) and value (B×K×Cv×h×w). `top_k` is the sparse read of `read` (None: dense).
    """

    def __init__(self, mem_size: int = 8, top_k: int | None = 30) -> None:
        if mem_size < 0:
            raise ValueError(f"mem_size must be >= 0, got {mem_size}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.mem_size = mem_size
        self.top_k = top_k
        self.pinned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.working: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.pinned) + len(self.working)

    def write(self, key: torch.Tensor, value: torch.Tensor, pinned: bool = False) -> None:
        """Store one frame's key and value; pinned frames are never evicted."""
        if pinned:
            self.pinned.append((key, value))
            return
        self.working.append((key, value))
        self.evict()

    def evict(self) -> None:
        """Keep the working memory within `mem_size`: oldest frames out first."""
        del self.working[: max(0, len(self.working) - self.mem_size)]

    def clear_working(self) -> None:
        """Forget the working frames (a new propagation pass starts from the annotations alone)."""
        self.working.clear()

    def read(self, query_key: torch.Tensor) -> torch.Tensor:
        """Readout B×K×Cv×h×w for a query key B×Ck×h×w."""
        entries = self.pinned + self.working
        if not entries:
            raise RuntimeError("memory is empty: write the annotated frame before reading")
        b, ck, h, w = query_key.shape
        mem_key = torch.cat([k.flatten(2) for k, _ in entries], dim=2)
        mem_value = torch.cat([v.flatten(3) for _, v in entries], dim=3)
        out = read(mem_key, mem_value, query_key.flatten(2), self.top_k)
        return out.reshape(b, mem_value.shape[1], mem_value.shape[2], h, w)
