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


def affinity(
    mem_key: torch.Tensor, query_key: torch.Tensor, clamp: float = AFFINITY_CLAMP, mem_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled negative squared L2 distance (STCN), B×N×M for memory keys B×C×N and query keys B×C×M.

    The query's own ||q||² is constant over memory positions, so it cancels in the softmax and is left out.
    Computed in float32 even under autocast: in float16 the difference of two large terms loses the affinity.
    `mem_sq` (B×N×1, the keys' squared norms) may be passed in by a caller that keeps it between reads.
    """
    c = mem_key.shape[1]
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):  # constants: TorchScript
        mem_key, query_key = mem_key.float(), query_key.float()
        if mem_sq is None:
            mem_sq = squared_norms(mem_key)
        cross = mem_key.transpose(1, 2) @ query_key  # B×N×M
        return ((2 * cross - mem_sq) / math.sqrt(c)).clamp(min=-clamp)


def squared_norms(mem_key: torch.Tensor) -> torch.Tensor:
    """‖k_m‖² of memory keys B×C×N, as B×N×1 float32 (the memory's part of the affinity, fixed between writes)."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return mem_key.float().pow(2).sum(1).unsqueeze(2)


def softmax_weights(aff: torch.Tensor) -> torch.Tensor:
    """Softmax over memory positions (dim 1), shifted by the maximum for stability."""
    return torch.softmax(aff - aff.amax(dim=1, keepdim=True), dim=1)


def read(
    mem_key: torch.Tensor,
    mem_value: torch.Tensor,
    query_key: torch.Tensor,
    top_k: int | None = None,
    mem_mask: torch.Tensor | None = None,
    mem_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Readout B×K×Cv×M: memory values B×K×Cv×N weighted by the softmax affinity to query keys B×Ck×M.

    With top_k < N only the k best memory positions of each query take part, gathered and summed, so the readout
    costs k·M instead of N·M value reads. Without top_k (training, where gradients need every position) or when
    k covers the memory, the read is the dense softmax. `mem_mask` (B×N, training) leaves out the positions of
    frames that are not in a sample's memory (see `clip_memory_frames`); `mem_sq` see `affinity`.
    """
    aff = affinity(mem_key, query_key, mem_sq=mem_sq)  # B×N×M
    if mem_mask is not None:
        aff = aff.masked_fill(~mem_mask[:, :, None], float("-inf"))
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


def clip_memory_frames(frame_index: torch.Tensor, mem_every: int = 1, mem_size: int | None = None) -> torch.Tensor:
    """Which frames of a training clip are in memory when each frame is read, following the inference schedule.

    frame_index B×T (the clip's frames in the source video, in clip order, either direction) → visible B×T×T with
    visible[b, i, j] true when frame j < i is in memory while frame i is read. Frame 0 (the annotated frame) is pinned;
    a later frame is written when it lies at least `mem_every` source frames from the last written one, as
    `inferer.PropagationState` writes every `mem_every`-th frame; at most `mem_size` written frames are kept, the
    newest (None: all). With `mem_every` 1 and no `mem_size`, every earlier frame is visible.
    """
    b, t = frame_index.shape[0], frame_index.shape[1]
    visible = torch.zeros(b, t, t, dtype=torch.bool, device=frame_index.device)
    index: list[list[int]] = frame_index.tolist()
    for n in range(b):
        written: list[int] = []
        last = 0
        for i in range(1, t):
            start = 0 if mem_size is None else max(0, len(written) - mem_size)
            visible[n, i, 0] = True
            for j in written[start:]:
                visible[n, i, j] = True
            if abs(index[n][i] - index[n][last]) >= mem_every:
                written.append(i)
                last = i
    return visible


class MemoryBank:
    """One video's inference memory: pinned frames (annotations) plus at most `mem_size` working frames.

    The bank owns its capacity: `write` stores a frame and calls `evict`, which drops the oldest working frames
    (override it for another rule), so peak memory stays flat whatever the video length. Each entry holds one frame's
    key (B×Ck×h×w) and value (B×K×Cv×h×w). `top_k` is the sparse read of `read` (None: dense). The concatenated
    memory is kept between reads and rebuilt after a change, so entries change only through `write`, `evict` and
    `clear_working`.
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
        self._flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # keys, values, ‖k‖² of all entries

    def __len__(self) -> int:
        return len(self.pinned) + len(self.working)

    def write(self, key: torch.Tensor, value: torch.Tensor, pinned: bool = False) -> None:
        """Store one frame's key and value; pinned frames are never evicted."""
        self._flat = None
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
        self._flat = None

    def read(self, query_key: torch.Tensor) -> torch.Tensor:
        """Readout B×K×Cv×h×w for a query key B×Ck×h×w."""
        entries = self.pinned + self.working
        if not entries:
            raise RuntimeError("memory is empty: write the annotated frame before reading")
        b, ck, h, w = query_key.shape
        if self._flat is None:  # entries change only on writes (every mem_every frames): concatenate once per write
            mem_key = torch.cat([k.flatten(2) for k, _ in entries], dim=2)
            self._flat = (mem_key, torch.cat([v.flatten(3) for _, v in entries], dim=3), squared_norms(mem_key))
        mem_key, mem_value, mem_sq = self._flat
        out = read(mem_key, mem_value, query_key.flatten(2), self.top_k, mem_sq=mem_sq)
        return out.reshape(b, mem_value.shape[1], mem_value.shape[2], h, w)
