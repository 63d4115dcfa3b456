"""Jobs sharded over `torchrun` ranks: each rank takes its share of a list, rank 0 merges what the ranks found.

The configs (`batch_inference.json`, `multi_gpu_evaluate.json`) start and end the process group, as
`multi_gpu_train.json` does; everything here also runs as one plain process (no process group: one rank of one).
Shares come from MONAI's `partition_dataset` (interleaved, uneven lists allowed), so a rank's share is fixed by the
list alone and a rerun gives every rank the same videos again. Under torchrun each rank ends with its launcher
(`die_with_launcher`), and rank 0 holds the output folder's lock for the whole job (`job_lock`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from monai.data import partition_dataset

from scripts.errors import InputError
from scripts.staging import output_lock

T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """Under torchrun, make this rank end when its launcher ends, however the launcher ends (called first by every
    job a config may start under torchrun).

    torchrun starts each rank in a session of its own, so killing the launcher's process group (``kill -9 -PGID``, a
    closed terminal) does not reach the ranks, and orphaned ranks would go on writing while a rerun starts. The
    kernel's parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``, through ctypes as Python has no binding) kills
    the rank the moment its parent, torchrun's agent, exits. It was chosen over a watchdog thread polling the parent
    pid because the kernel delivers it at once, even while the rank holds the GIL in a long native call, with
    nothing to poll. The signal is SIGKILL: nothing waits for the rank's results any more, and what a killed job
    leaves (its staging folder, the lock file) the next job there clears (`scripts.staging`). On other systems this
    does nothing (torchrun jobs run on Linux here).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    if parent == 1 or os.getppid() != parent:  # the launcher ended before the signal was armed
        print("error: torchrun's launcher has ended; this rank stops too", file=sys.stderr, flush=True)
        os._exit(1)


@contextmanager
def job_lock(directory: str | Path) -> Iterator[None]:
    """The job's `output_lock` on ``directory``, held by rank 0 for every rank until the job ends.

    Every rank is refused alike, with rank 0's line naming the job that holds the folder. The lock is in the folder
    itself, so with one folder per node (not shared) only rank 0's node is guarded.
    """
    rank, _ = rank_and_size()
    with ExitStack() as stack:
        refusal = None
        if rank == 0:
            try:
                stack.enter_context(output_lock(directory))
            except InputError as exc:
                refusal = str(exc)
        refusal = gather(refusal)[0]
        if refusal is not None:
            raise InputError(refusal)
        yield


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
