"""Propagation speed and peak memory of the TCMN variants on synthetic echo video: a benchmark, not a test.

    python -m scripts.tools.benchmark [--variants lite] [--sizes 384x288,512x512] [--objects 1,3] [--memory one,full]
        [--runtimes torch] [--frames 300] [--threads N] [--device cpu|cuda] [--mem-every 5] [--mem-size 8]
        [--top-k 30] [--infer-size S] [--checkpoint PATH|random] [--warmup 5] [--profile] [--json results.json]
    python -m scripts.tools.benchmark --table results.json    # the model card's table (Markdown) from a saved run

Every configuration (the product of variants, sizes, objects, memory states, runtimes and lengths) runs in a fresh
subprocess, so its RSS high-water mark is its own and not the largest seen so far. Frames come lazily from
`SyntheticEchoSource` (a long 512×512 clip held whole would dwarf the memory measured), and the propagation loop is the
inference job's (`ModelPropagator.propagate`: channels_last network, inference mode, label maps as uint8), with the
label maps discarded. Objects: 1 the cavity, 2 adds the myocardium, 3 splits the myocardium into left and right.
Memory: `one` keeps only the annotated frame (mem_size 0), `full` starts timing once the working memory holds its
`--mem-size` frames, so the two give the per-frame cost of an empty and of a full memory. Timing covers the loop
only: model construction, the annotated frame and the first `--warmup` propagated frames (and with `full` the frames
that fill the memory) are excluded, and so is the time spent generating synthetic frames (shown apart as
`gen ms/f`; decoding a real video costs something else). Sizes are width×height, e.g. 384x288.

Memory columns, in MiB: `RSS start` when the timed loop starts, `loop peak` the RSS high-water over the timed loop
(Linux `/proc/self/clear_refs` resets it at loop start; `-` where that is unavailable), `process peak` the whole
process's high-water, model construction included (VmHWM: `ru_maxrss` would also count the parent's RSS at fork),
and on CUDA `cuda peak`, the largest allocation over the loop.

`--profile` adds a per-stage breakdown in ms per propagated frame: key encoding, memory read, decode and value
encoding (written every `mem-every` frames, so averaged over all frames), and `other` (frame conversion, resizing,
softmax, label maps), and the ratio of the full-memory to the one-frame time per frame. CUDA is synchronised around
each stage, which slows the loop a little; use it to choose widths, not to quote speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

from scripts.tools.benchmark_tables import STAGES, markdown_table, print_table, row_key


def parse_size(text: str) -> tuple[int, int]:
    """'384x288' (or 384×288) → (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×X]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 384x288, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="lite", help="comma-separated TCMN variants")
    parser.add_argument("--sizes", default="384x288,512x512", help="comma-separated WIDTHxHEIGHT frame sizes")
    parser.add_argument("--objects", default="1,3", help="comma-separated numbers of objects (1 to 3)")
    parser.add_argument("--memory", default="one,full", help="comma-separated memory states: one, full")
    parser.add_argument("--runtimes", default="torch", help="comma-separated runtimes of the network steps")
    parser.add_argument("--frames", default="300", help="comma-separated video lengths")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mem-every", type=int, default=5)
    parser.add_argument("--mem-size", type=int, default=8)
    parser.add_argument("--top-k", default="30", help="top-k memory read; 'none' for the dense read")
    parser.add_argument(
        "--infer-size", type=int, default=None, help="the inferer's `size` (short side); native if unset"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="weights to load, or 'random'; default the variant's shipped weights (bundle/models/model.pt for lite, "
        "model_<variant>.pt for the others) if present, else random initialisation",
    )
    parser.add_argument("--warmup", type=int, default=5, help="propagated frames excluded from timing")
    parser.add_argument("--seed", type=int, default=0, help="synthetic clip and random-initialisation seed")
    parser.add_argument("--profile", action="store_true", help="print a per-stage breakdown in ms/frame")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--table", type=Path, default=None, help="print the Markdown table of a saved --json run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, as JSON
    args = parser.parse_args(argv)
    if args.table is not None:
        return args
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    args.variants, args.memory, args.runtimes = split(args.variants), split(args.memory), split(args.runtimes)
    args.sizes = [parse_size(s) for s in split(args.sizes)]
    args.frames = [int(f) for f in split(args.frames)]
    args.objects = [int(k) for k in split(args.objects)]
    args.top_k = None if args.top_k.lower() == "none" else int(args.top_k)
    if not set(args.objects) <= {1, 2, 3}:
        parser.error(f"--objects {args.objects}: the synthetic clip has 1 to 3 objects")
    from scripts.runtime import runtime_problem

    for runtime in args.runtimes:
        problem = runtime_problem(runtime, args.device)
        if problem is not None:
            parser.error(f"--runtimes {runtime}: {problem}")
    if not set(args.memory) <= {"one", "full"}:
        parser.error(f"--memory {args.memory}: the states are one and full")
    too_short = [f for f in args.frames if f < skipped_frames(args.warmup, args.mem_every, args.mem_size, "full") + 2]
    if "full" in args.memory and too_short:
        parser.error(f"--frames {too_short} leave nothing to time once the memory is full")
    elif min(args.frames) < args.warmup + 2:
        parser.error(f"--frames {args.frames} leave nothing to time after the annotated frame and --warmup")
    return args


def skipped_frames(warmup: int, mem_every: int, mem_size: int, memory: str) -> int:
    """Frames before timing starts: the annotated one, the warm-up, and with a full memory those that fill it."""
    return 1 + warmup + (mem_every * mem_size if memory == "full" else 0)


def annotation(labels, objects: int):
    """Frame 0's label map with 1-3 objects from the echo clip's cavity (1) and myocardium (2): 1 keeps the cavity,
    3 splits the myocardium at the image centre into 2 (left) and 3 (right)."""
    import numpy as np

    if objects == 1:
        return (labels == 1).astype(np.uint8)
    out = labels.copy()
    if objects == 3:
        right = np.zeros_like(out, dtype=bool)
        right[:, out.shape[1] // 2 :] = True
        out[(out == 2) & right] = 3
    return out


# ---------------------------------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int | None:
    """VmRSS/VmHWM of this process in KiB (Linux), None elsewhere."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _peak_kib() -> int:
    """This process's RSS high-water in KiB: VmHWM where /proc has it, else ru_maxrss (KiB on Linux).

    ru_maxrss is the fallback only: on Linux it also counts the parent's RSS at fork time (the forked copy's
    high-water survives exec), so a worker started by a large process would report that process's size.
    """
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the loop's own high-water mark can be read afterwards."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


class StageTimer:
    """Wall time per stage, with the device synchronised around each call so GPU work is charged to its stage."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _load_weights(net, variant: str, checkpoint: str | None, device) -> str:
    """Load the requested weights; returns how the model was initialised, for the table."""
    import torch

    from scripts.network import weights_file

    explicit = checkpoint is not None
    path = Path(checkpoint if explicit else weights_file(variant))
    if checkpoint == "random" or (not explicit and not path.is_file()):
        return "random init"
    state = torch.load(path, map_location=device, weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        if explicit:
            raise ValueError(f"{path} does not hold {variant} TCMN weights") from err
        return f"random init ({path.name} is not a {variant} model)"
    return str(path)


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements."""
    import torch

    from scripts import memory, prepare_job
    from scripts.inferer import ModelPropagator, PropagationInferer
    from scripts.network import TCMN
    from scripts.runtime import runtime_network
    from scripts.synthetic import SyntheticEchoSource

    prepare_job()  # flushes denormals, as the inference job does
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    net = TCMN(cfg["variant"], pretrained=False)
    weights = _load_weights(net, cfg["variant"], cfg["checkpoint"], device)
    timer = StageTimer(sync)

    def make_memory() -> memory.MemoryBank:
        """The inference job's bank; with --profile its reads are timed (an instance attribute shadows the method)."""
        mem_size = cfg["mem_size"] if cfg["memory"] == "full" else 0
        bank = memory.MemoryBank(mem_size=mem_size, top_k=cfg["top_k"])
        if cfg["profile"]:
            bank.read = timer.wrap("memory read", bank.read)
        return bank

    inferer = PropagationInferer(make_memory, cfg["mem_every"], size=cfg["infer_size"], device=device, progress=False)
    net = runtime_network(net, cfg["runtime"])  # as the inference job's propagator gets it
    propagator = ModelPropagator(net, inferer)  # channels_last and eval, as the inference job
    width, height = cfg["size"]
    clip = SyntheticEchoSource(cfg["frames"], height, width, seed=cfg["seed"])
    generation = [0.0]

    class TimedSource:
        """The clip, with the time spent generating its frames kept apart from the propagation's."""

        info = clip.info

        def __len__(self) -> int:
            return len(clip)

        def __getitem__(self, t: int):
            start = time.perf_counter()
            frame = clip[t]
            generation[0] += time.perf_counter() - start
            return frame

    if cfg["profile"]:  # instance attributes shadow the methods the inferer calls
        net.encode_key = timer.wrap("key encoding", net.encode_key)
        net.decode = timer.wrap("decode", net.decode)
        net.encode_value = timer.wrap("value encoding", net.encode_value)

    skip = skipped_frames(cfg["warmup"], cfg["mem_every"], cfg["mem_size"], cfg["memory"])
    start = generated = None
    rss_start = peak_reset = peak_before = None
    count = 0
    for count, (_, labels) in enumerate(
        propagator.propagate(TimedSource(), {0: annotation(clip.labels(0), cfg["objects"])}), start=1
    ):
        if count == skip:
            sync()
            peak_before = _peak_kib()  # the reset below forgets it
            rss_start, peak_reset = _status_kib("VmRSS"), _reset_peak_rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            timer.reset()
            generated = generation[0]
            start = time.perf_counter()
    sync()
    elapsed = time.perf_counter() - start
    timed = count - skip
    generation_s = generation[0] - generated
    loop_s = elapsed - generation_s
    result = {
        **cfg,
        "weights": weights,
        "timed_frames": timed,
        "fps": timed / loop_s,
        "ms_per_frame": 1000 * loop_s / timed,
        "gen_ms_per_frame": 1000 * generation_s / timed,
        "rss_start_mib": _mib(rss_start),
        "loop_peak_rss_mib": _mib(_status_kib("VmHWM")) if peak_reset else None,
        "process_peak_rss_mib": max(peak_before, _peak_kib()) / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "torch": torch.__version__,
    }
    if cfg["profile"]:
        stages = {stage: 1000 * timer.seconds[stage] / timed for stage in STAGES}
        stages["other"] = 1000 * loop_s / timed - sum(stages.values())
        result["profile_ms_per_frame"] = stages
        result["profile_calls"] = {stage: timer.calls[stage] for stage in STAGES}
    return result


# ---------------------------------------------------------------------------------------------------------- parent


def run_configuration(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in a fresh interpreter; failures come back as a row with their error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"])}
    command = [sys.executable, "-m", "scripts.tools.benchmark", "--worker", json.dumps(cfg)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return {**cfg, **result}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if args.worker is not None:
        try:
            print(json.dumps(measure(json.loads(args.worker))))
        except Exception as err:  # reported as the configuration's row; the traceback stays on stderr
            print(json.dumps({"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"}))
            raise
        return
    configurations = [
        {
            "variant": variant,
            "runtime": runtime,
            "size": list(size),
            "objects": objects,
            "memory": state,
            "frames": frames,
            "threads": args.threads,
            "device": args.device,
            "mem_every": args.mem_every,
            "mem_size": args.mem_size,
            "top_k": args.top_k,
            "infer_size": args.infer_size,
            "checkpoint": args.checkpoint,
            "warmup": args.warmup,
            "seed": args.seed,
            "profile": args.profile,
        }
        for variant, size, objects, runtime, state, frames in product(
            args.variants, args.sizes, args.objects, args.runtimes, args.memory, args.frames
        )
    ]
    print(
        f"TCMN propagation benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"device {args.device}, {args.threads} threads, mem_every {args.mem_every}, mem_size {args.mem_size}, "
        f"top_k {args.top_k}; synthetic echo frames, labels discarded; timed after the annotated frame and "
        f"{args.warmup} warm-up frames (memory full: and the frames that fill it), frame generation excluded"
    )
    rows = []
    for cfg in configurations:
        row = run_configuration(cfg)
        rows.append(row)
        done = f"{row['fps']:.2f} frames/s, weights: {row['weights']}" if "error" not in row else row["error"]
        print(f"  {' '.join(row_key(cfg))} {cfg['frames']} frames: {done}", flush=True)
    print()
    print_table(rows, args.profile)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
