"""Training throughput and peak memory of the `lite` and `full` TCMN variants, one fresh process per variant.

Each measurement runs what one `SupervisedTrainer` iteration of `train.json` runs (clip propagation, DiceCE, plus
λ · temporal contrastive loss with `--contrastive`, backward, AdamW step, through `scripts.training.TrainingStep`) on
random clips of the configured shape, so it isolates the network's cost from data loading. Variants run in separate
subprocesses so a peak-memory reading (the process's RSS high-water mark, or CUDA's peak allocation) is never the
other variant's.

    python -m scripts.tools.benchmark_training [--variant lite full] [--iterations 10] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

VARIANTS = ("lite", "full")


def synthetic_batch(batch_size: int, num_frames: int, size: int, max_objects: int, seed: int = 0) -> dict:
    """Random frames and box labels in the layout `ClipDataset` yields (image B×T×3×H×W, label B×T×1×H×W)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(batch_size, num_frames, 1, size, size, dtype=torch.int64)
    for b in range(batch_size):
        for k in range(1, max_objects + 1):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            for t in range(num_frames):  # each object drifts a few pixels per frame
                label[b, t, 0, y + 2 * t : y + 2 * t + size // 3, x + t : x + t + size // 3] = k
    return {
        "image": torch.rand(batch_size, num_frames, 3, size, size, generator=g),
        "label": label,
        "frame_index": torch.arange(num_frames).repeat(batch_size, 1) * 2,
        "num_objects": torch.full((batch_size,), max_objects),
    }


def measure(args: argparse.Namespace) -> dict:
    """Time `args.iterations` training iterations of one variant after `args.warmup` untimed ones."""
    from monai.losses import DiceCELoss

    from scripts.losses import TemporalContrastiveLoss
    from scripts.network import TCMN
    from scripts.training import ClipPropagation, TrainingStep

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the same network and optimiser as train.json (lite freezes its ImageNet stride-4 layers there)
    network = TCMN(args.variant, pretrained=False, freeze_stride4=args.variant == "lite").to(device)
    params = [p for p in network.parameters() if p.requires_grad]
    engine = SimpleNamespace(
        state=SimpleNamespace(device=device),
        network=ClipPropagation(network),
        optimizer=torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
    )
    terms = {  # train.json's loss_terms
        "seg_loss": {"loss": engine.loss_function, "weight": 1.0},
        "contrastive_loss": {"loss": TemporalContrastiveLoss(0.1, 3, 8), "weight": 0.1},
    }
    step = TrainingStep(terms, use_contrastive=args.contrastive)
    batch = synthetic_batch(args.batch_size, args.num_frames, args.size, max_objects=2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(engine, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.iterations):
        loss = step(engine, batch)[0]["loss"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {
        "variant": args.variant,
        "device": str(device),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "num_frames": args.num_frames,
        "size": args.size,
        "contrastive": args.contrastive,
        "iterations": args.iterations,
        "trainable_params": sum(p.numel() for p in params),
        "seconds_per_iteration": elapsed / args.iterations,
        "clips_per_second": args.iterations * args.batch_size / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "rss_before_model_mib": rss_before / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "last_loss": loss,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (allocator, autotuning)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--contrastive", action="store_true", help="add the temporal contrastive loss (off in train.json)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one variant, result on stdout
    args = parser.parse_args(argv)
    if min(args.iterations, args.threads, args.batch_size, args.num_frames, args.size) < 1 or args.warmup < 0:
        parser.error("iterations, threads, batch_size, num_frames and size must be >= 1, warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.variant = args.variant[0]
        print("RESULT " + json.dumps(measure(args)))
        return 0
    results = []
    forwarded = [
        f"--{name}={getattr(args, name)}"
        for name in ("iterations", "warmup", "threads", "device", "batch_size", "num_frames", "size")
    ] + (["--contrastive"] if args.contrastive else [])
    for variant in args.variant:
        cmd = [sys.executable, "-m", "scripts.tools.benchmark_training", "--worker", "--variant", variant, *forwarded]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout + proc.stderr)
            print(f"{variant}: benchmark failed (exit status {proc.returncode})", file=sys.stderr)
            return 1
        r = json.loads(lines[-1][len("RESULT ") :])
        results.append(r)
        cuda = f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] is not None else ""
        print(
            f"{r['variant']:>4} on {r['device']} ({r['threads']} thread(s)), {r['batch_size']} clips × "
            f"{r['num_frames']} frames at {r['size']}²: {r['clips_per_second']:.3f} clips/s "
            f"({r['seconds_per_iteration']:.2f} s/iteration over {r['iterations']}), peak RSS "
            f"{r['peak_rss_mib']:.0f} MiB ({r['rss_before_model_mib']:.0f} MiB before the model){cuda}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
