"""Jobs sharded over `torchrun` ranks: each rank takes its share of a list, rank 0 merges what the ranks found.

The configs (`batch_inference.json`, `multi_gpu_evaluate.json`) start and end the process group, as
`multi_gpu_train.json` does; everything here also runs as one plain process (no process group: one rank of one).
Shares come from MONAI's `partition_dataset` (interleaved, uneven lists allowed), so a rank's share is fixed by the
list alone and a rerun gives every rank the same videos again.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from monai.data import partition_dataset

from scripts.errors import InputError
from scripts.evaluate import OUTPUTS, Evaluation
from scripts.outputs import prepare_output_dir

T = TypeVar("T")


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s share of `items`: every `world_size`-th item from its own (`partition_dataset`, uneven
    allowed); with fewer items than ranks the last ranks get none, where MONAI refuses to partition."""
    items = list(items)
    if world_size == 1:
        return items
    if len(items) < world_size:
        return items[rank : rank + 1]
    return list(partition_dataset(items, num_partitions=world_size, shuffle=False, even_divisible=False)[rank])


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (`all_gather_object`: picklable values of any size)."""
    rank, world_size = rank_and_size()
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


class DistributedEvaluation(Evaluation):
    """`Evaluation` with its sequences shared over the ranks; rank 0 writes the outputs of the whole set.

    Each rank propagates and scores its share (its predictions kept in a private temporary folder); the scores
    and predicted PNGs are gathered, and rank 0 then runs the single-process `Evaluation.run`, whose per-sequence
    step hands back the gathered results in the original sequence order. The metrics are therefore those of a
    single-process run: each sequence is scored alone, and the means are taken in the same order. Works across
    nodes too (the predictions travel through the process group, not a shared folder). Every rank returns the
    report.
    """

    def run(self) -> dict:
        rank, world_size = rank_and_size()
        if world_size == 1:
            return super().run()
        prepare_output_dir(self.output_dir, OUTPUTS, self.overwrite)  # every rank refuses alike, early
        selected = self.select()
        mine: dict[str, tuple[dict | str, dict[str, bytes]]] = {}
        scratch = Path(tempfile.mkdtemp(prefix=".tcmn-eval-"))
        try:
            for seq in share(selected, rank, world_size):
                pred_dir = scratch / seq.dataset / seq.name
                try:
                    result = super().evaluate_sequence(seq, pred_dir)
                except InputError as exc:  # a sequence that cannot be scored: rank 0's run reports it
                    mine[seq.key] = (str(exc), {})
                    continue
                mine[seq.key] = (result, {p.name: p.read_bytes() for p in sorted(pred_dir.iterdir())})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._gathered = {key: value for part in gather(mine) for key, value in part.items()}
        report = super().run() if rank == 0 else None
        return gather(report)[0]

    def evaluate_sequence(self, seq, pred_dir: Path) -> dict:
        """Under a process group: the result a rank gathered, its predictions written into `pred_dir`."""
        gathered = getattr(self, "_gathered", None)
        if gathered is None:
            return super().evaluate_sequence(seq, pred_dir)
        result, pngs = gathered[seq.key]
        if isinstance(result, str):
            raise InputError(result)
        pred_dir.mkdir(parents=True)
        for name, data in pngs.items():
            (pred_dir / name).write_bytes(data)
        return result
