"""Weighted average of network weights files: model soups and WiSE-FT interpolation, the way 0.6.0 was made.

    python -m scripts.tools.average_weights A.pt B.pt [C.pt …] --output OUT.pt [--weights 0.5,0.25,0.25] [--overwrite]

Each input is a network state dict (``model.pt``, ``model_ema.pt``) or a training checkpoint (its ``network`` entry).
Every floating-point tensor of the output is the weighted mean of the inputs' (weights default to equal, and are
scaled to sum to 1); integer buffers (batch norm's ``num_batches_tracked``) are taken from the first input. Averaging
fine-tunes of one starting point is a model soup; averaging a fine-tune with its starting weights is WiSE-FT
(Wortsman et al. 2022); the shipped 0.6.0 weights are ``model.pt`` of 0.5.0 (0.5) with the averaged weights of two
CPU runs (0.25 each), ``training_log.md`` session 9. PyTorch's ``swa_utils.AveragedModel`` averages a network
in memory during one run; nothing in PyTorch, MONAI or Ignite averages weights files of separate runs, hence this.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from scripts.errors import InputError, OneLineParser
from scripts.network import read_state_dict


def average_state_dicts(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts with the same keys and shapes (``names`` name them in errors)."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            key = next(iter(set(state) ^ set(first)))
            raise InputError(
                f"{name}: its keys differ from those of {names[0]} (e.g. {key!r}): weights of another network"
            )
        for key, value in first.items():
            if state[key].shape != value.shape:
                raise InputError(f"{name}: {key!r} is {tuple(state[key].shape)}, {tuple(value.shape)} in {names[0]}")
    total = float(sum(weights))
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            mixed = sum(float(w) / total * s[key].double() for w, s in zip(weights, states))
            out[key] = mixed.to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers, e.g. 0.5,0.25,0.25") from None
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be above 0")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m scripts.tools.average_weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="weights files (state dicts or training checkpoints)")
    parser.add_argument("--output", required=True, type=Path, help="the averaged state dict to write")
    parser.add_argument("--weights", type=_weights, help="one per input, comma-separated (default: equal)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    if len(args.inputs) < 2:
        parser.error("give at least two weights files to average")
    if args.weights is None:
        args.weights = [1.0] * len(args.inputs)
    if len(args.weights) != len(args.inputs):
        parser.error(f"--weights: {len(args.weights)} weights for {len(args.inputs)} files")
    for path in args.inputs:
        if not path.is_file():
            parser.error(f"{path}: no such file")
        if args.output.exists() and path.resolve() == args.output.resolve():
            parser.error(f"--output {args.output}: is one of the inputs")
    parser.check_output_file("--output", args.output, args.overwrite)
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    try:
        states = [read_state_dict(path) for path in args.inputs]
        averaged = average_state_dicts(states, args.weights, [str(p) for p in args.inputs])
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    # written beside the output and renamed into place, so a failed write leaves no half-written file
    handle, staged = tempfile.mkstemp(prefix=".average_weights.", suffix=".pt", dir=args.output.parent)
    os.close(handle)
    try:
        torch.save(averaged, staged)
        os.replace(staged, args.output)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    total = sum(args.weights)
    mix = ", ".join(f"{w / total:.3g} × {p}" for w, p in zip(args.weights, args.inputs))
    print(f"wrote {args.output}: {mix}")
    return args.output


if __name__ == "__main__":
    main()
