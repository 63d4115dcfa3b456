"""The memory: affinity between query and memory keys, softmax (or top-k) readout of memory values, and the bank.

Kept apart from the network so bounded storage and eviction live in one place (as in XMem/Cutie's memory manager).
Training builds its memory as plain tensors and reads it densely (`read_dense`); inference stores frames in a
`MemoryBank`, which the configs declare (`memory` in `inference.json`), so a new eviction rule is one subclass that
overrides `evict` and one config line.
"""

from __future__ import annotations

import math
import warnings

import torch

# Affinities beyond this magnitude only produce exp() underflow into denormal floats, which are very slow on x86.
AFFINITY_CLAMP = 50.0
# bytes per (memory position, query position) pair at the read's peak: the dense read holds the float32 affinity, its
# max-shifted copy and the softmax weights; the top-k read one matrix of candidate scores (float32 at most)
READ_BYTES_PER_PAIR = {"dense": 12, "top_k": 4}


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


def read_dense(
    mem_key: torch.Tensor,
    mem_value: torch.Tensor,
    query_key: torch.Tensor,
    mem_mask: torch.Tensor | None = None,
    mem_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Readout B×K×Cv×M: memory values B×K×Cv×N weighted by the softmax affinity to query keys B×Ck×M, over every
    memory position (training, where gradients need them all; TorchScript; the export). `mem_mask` (B×N) leaves out
    the positions of frames that are not in a sample's memory (see `clip_memory_frames`); `mem_sq` see `affinity`."""
    b, k, cv, n = mem_value.shape
    aff = affinity(mem_key, query_key, mem_sq=mem_sq)  # B×N×M
    if mem_mask is not None:
        aff = aff.masked_fill(~mem_mask[:, :, None], float("-inf"))
    return (mem_value.reshape(b, k * cv, n) @ softmax_weights(aff)).reshape(b, k, cv, -1)


def read_top_k(
    keys_t: torch.Tensor,
    values_t: torch.Tensor,
    sq: torch.Tensor,
    query_key: torch.Tensor,
    top_k: int,
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sparse readout B×M×V: each query's `top_k` best memory positions, softmax-weighted, from memory keys
    B×N×Ck (`keys_t`, positions first so each query's scores and each position's key and value are contiguous),
    values B×N×V, squared key norms B×N (+inf leaves a position out) and query keys B×Ck×M.

    Two passes, so that the N·M part is one matrix product and one selection: the candidates are chosen on
    2⟨q, k⟩ − ‖k‖² (the affinity up to its scale and the query's constant), from `candidates` when given
    (`candidate_keys`: a centred, reduced-precision copy; on CPUs with native bfloat16 products that pass costs a
    fraction of float32); then the chosen positions' affinities are recomputed exactly in float32 and weighted. A
    reduced-precision selection can only swap positions whose scores differ by less than its rounding. The weighted
    sum is one sparse (CSR) × dense product: gathering k values per query first would copy k·M·V floats.
    """
    b, n, c = keys_t.shape
    m = query_key.shape[2]
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        query_t = query_key.float().transpose(1, 2).contiguous()  # B×M×Ck
        low, low_sq, centre = (keys_t, sq, None) if candidates is None else candidates
        shifted = query_t if centre is None else query_t - centre
        scores = torch.baddbmm((-low_sq)[:, None, :].to(low.dtype), (2 * shifted).to(low.dtype), low.transpose(1, 2))
        # positions in increasing order within each query: the CSR layout below wants sorted column indices
        chosen = torch.topk(scores, top_k, dim=2, sorted=False).indices.sort(dim=2).values  # B×M×k
        flat = (chosen + torch.arange(b, device=chosen.device)[:, None, None] * n).reshape(-1)
        keys = keys_t.reshape(b * n, c).index_select(0, flat).reshape(b, m, top_k, c)
        cross = (keys * query_t[:, :, None, :]).sum(3)  # B×M×k; elementwise: a batched product of 1-column
        # matrices would run one tiny GEMM per query
        aff = (2 * cross - sq.reshape(-1).index_select(0, flat).reshape(b, m, top_k)) / math.sqrt(c)
        weights = torch.softmax(aff.clamp(min=-AFFINITY_CLAMP), dim=2)  # softmax shifts by the maximum itself
        rows = torch.arange(0, b * m * top_k + 1, top_k, device=flat.device)
        with warnings.catch_warnings():  # PyTorch calls its CSR tensors beta, once per process
            warnings.simplefilter("ignore", UserWarning)
            sparse = torch.sparse_csr_tensor(
                rows, flat, weights.reshape(-1).to(values_t.dtype), (b * m, b * n), check_invariants=False
            )
        v = values_t.shape[2]
        return (sparse @ values_t.reshape(b * n, v)).reshape(b, m, v)


def candidate_keys(keys_t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Memory keys B×N×Ck prepared for `read_top_k`'s candidate pass: centred on their mean (‖q − k‖² does not change
    when both move, and the scores of centred keys are small, so reduced precision rounds them far less), cast to
    `dtype`, with their float32 squared norms B×N and the centre B×1×Ck."""
    centre = keys_t.mean(1, keepdim=True)
    centred = keys_t - centre
    return centred.to(dtype), centred.pow(2).sum(2), centre


def selection_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype `read_top_k` chooses candidates in: bfloat16 for "auto" where products in it are native (CUDA with
    bf16, x86 with AVX512-BF16 or AMX), else float32 (emulated bfloat16 would be slower than float32)."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"select_precision must be auto, float32 or bfloat16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = [
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return torch.bfloat16 if device.type == "cpu" and any(native) else torch.float32


def first_kept(count: int, capacity: int | None) -> int:
    """The eviction rule, shared by the inference bank (`MemoryBank.evict`) and training's memory mask
    (`clip_memory_frames`): of `count` written frames, oldest first, those from this index on stay (the newest
    `capacity`; None: all)."""
    return 0 if capacity is None else max(0, count - capacity)


def clip_memory_frames(frame_index: torch.Tensor, mem_every: int = 1, mem_size: int | None = None) -> torch.Tensor:
    """Which frames of a training clip are in memory when each frame is read, following the inference schedule.

    frame_index B×T (the clip's frames in the source video, in clip order, either direction) → visible B×T×T with
    visible[b, i, j] true when frame j < i is in memory while frame i is read. Frame 0 (the annotated frame) is pinned;
    a later frame is written when it lies at least `mem_every` source frames from the last written one, as
    `inferer.PropagationState` writes every `mem_every`-th frame; the written frames kept are those the bank's
    eviction rule keeps (`first_kept` with room for `mem_size`, None: all). With `mem_every` 1 and no `mem_size`,
    every earlier frame is visible. TorchScript compiles it (the export scripts `TCMN.forward`), hence plain
    functions, not the bank object.
    """
    b, t = frame_index.shape[0], frame_index.shape[1]
    visible = torch.zeros(b, t, t, dtype=torch.bool, device=frame_index.device)
    index: list[list[int]] = frame_index.tolist()
    for n in range(b):
        written: list[int] = []
        last = 0
        for i in range(1, t):
            visible[n, i, 0] = True
            for j in written[first_kept(len(written), mem_size) :]:
                visible[n, i, j] = True
            if abs(index[n][i] - index[n][last]) >= mem_every:
                written.append(i)
                last = i
    return visible


class MemoryBank:
    """One video's inference memory: pinned frames (annotations) plus at most `mem_size` working frames.

    The bank owns its capacity: `write` stores a frame and calls `evict`, which drops the oldest working frames
    (override it for another rule), so peak memory stays flat whatever the video length. Each entry holds one frame's
    key (B×Ck×h×w) and value (B×K×Cv×h×w). `top_k` is the sparse read of `read_top_k` (None: dense), its
    candidates chosen in `select_precision` (`selection_dtype`). The memory is kept between reads in the layout the
    read wants (positions first, squared norms, the selection copy) and rebuilt after a change, so entries change
    only through `write`, `evict` and `clear_working`.
    """

    def __init__(self, mem_size: int = 8, top_k: int | None = 30, select_precision: str = "auto") -> None:
        if mem_size < 0:
            raise ValueError(f"mem_size must be >= 0, got {mem_size}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        selection_dtype(torch.device("cpu"), select_precision)  # refuse a bad name now, not at the first read
        self.mem_size = mem_size
        self.top_k = top_k
        self.select_precision = select_precision
        self.pinned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.working: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._flat: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.pinned) + len(self.working)

    @property
    def capacity(self) -> int:
        """The working frames this bank holds at most (besides the pinned ones)."""
        return self.mem_size

    def read_bytes(self, positions: int, pinned: int) -> int:
        """Peak bytes of one read of `positions` query positions with `pinned` annotated frames and a full working
        memory of frames of as many positions: every memory position meets every query position."""
        per_pair = READ_BYTES_PER_PAIR["dense" if self.top_k is None else "top_k"]
        return (pinned + self.capacity) * positions * positions * per_pair

    def write(self, key: torch.Tensor, value: torch.Tensor, pinned: bool = False) -> None:
        """Store one frame's key and value; pinned frames are never evicted."""
        self._flat = None
        if pinned:
            self.pinned.append((key, value))
            return
        self.working.append((key, value))
        self.evict()

    def evict(self) -> None:
        """Keep the working memory within `capacity` by the eviction rule (`first_kept`: oldest frames out first); a
        subclass overriding it reports its own `capacity` and `read_bytes`."""
        del self.working[: first_kept(len(self.working), self.mem_size)]

    def clear_working(self) -> None:
        """Forget the working frames (a new propagation pass starts from the annotations alone)."""
        self.working.clear()
        self._flat = None

    def _flatten(self) -> dict[str, torch.Tensor]:
        """All entries concatenated over positions, in the layout of the read that will use them (rebuilt once per
        write, not per read): channels first for the dense read, positions first (with the candidate copy) for the
        top-k read; only one of the two is kept."""
        entries = self.pinned + self.working
        key = torch.cat([k.flatten(2) for k, _ in entries], dim=2).float()  # B×Ck×N
        value = torch.cat([v.flatten(3) for _, v in entries], dim=3)  # B×K×Cv×N
        if self.top_k is None or self.top_k >= key.shape[2]:
            return {"key": key, "value": value, "sq": squared_norms(key)}
        b, k, cv, n = value.shape
        keys_t = key.transpose(1, 2).contiguous()
        low = selection_dtype(key.device, self.select_precision)
        select_keys, select_sq, centre = candidate_keys(keys_t, low)
        return {
            "keys_t": keys_t,
            "values_t": value.reshape(b, k * cv, n).transpose(1, 2).contiguous(),
            "sq": squared_norms(key)[..., 0],
            "select_keys": select_keys,
            "select_sq": select_sq,
            "centre": centre,
        }

    def read(self, query_key: torch.Tensor) -> torch.Tensor:
        """Readout B×K×Cv×h×w for a query key B×Ck×h×w."""
        if not len(self):
            raise RuntimeError("memory is empty: write the annotated frame before reading")
        if self._flat is None:
            self._flat = self._flatten()
        flat = self._flat
        b, _, h, w = query_key.shape
        k, cv = (self.pinned + self.working)[0][1].shape[1:3]
        if "keys_t" not in flat:  # dense: no top-k, or k covers the memory
            out = read_dense(flat["key"], flat["value"], query_key.flatten(2), mem_sq=flat["sq"])
            return out.reshape(b, k, cv, h, w)
        candidates = (flat["select_keys"], flat["select_sq"], flat["centre"])
        out = read_top_k(flat["keys_t"], flat["values_t"], flat["sq"], query_key.flatten(2), self.top_k, candidates)
        return out.transpose(1, 2).reshape(b, k, cv, h, w)
