"""ONNX export of one propagation step (key encoding → memory read → decoding) for runtimes without TorchScript.

    python -m scripts.tools.export --output step.onnx [--ckpt_path PATH] [--variant lite] [--height 288 --width 384]

The whole-clip TCMN is exported to TorchScript by `python -m monai.bundle ckpt_export`; ONNX gets the per-frame step
instead, so a caller keeps its own memory (keys B×Ck×N, values B×K×Cv×N, N = stored frames × h × w) and calls the
model once per query frame. The read is dense (no top-k) in the exported graph; N is a dynamic axis. The graph is
written by the exporter `--runtime onnxruntime|openvino` builds its per-frame graphs with (`runtime.onnx_bytes`), so
the bundle has one ONNX export path.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from scripts import prepare_job
from scripts.inferer import unwrap
from scripts.network import TCMN, VARIANTS, load_network_weights, weights_file
from scripts.runtime import ONNX_OPSET, onnx_bytes

INPUT_NAMES = ["frame", "mem_key", "mem_value"]
OUTPUT_NAMES = ["logits"]


class FrameStep(nn.Module):
    """frame B×3×H×W in [0, 1], memory keys B×Ck×N and values B×K×Cv×N → aggregated logits B×(K+1)×H×W."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = unwrap(network)

    def forward(self, frame: torch.Tensor, mem_key: torch.Tensor, mem_value: torch.Tensor) -> torch.Tensor:
        key, f16, f8, f4 = self.network.encode_key(frame)
        readout = self.network.read(mem_key, mem_value, key)
        return self.network.decode(readout, f16, f8, f4, (frame.shape[-2], frame.shape[-1]))


def example_inputs(
    network: nn.Module, height: int, width: int, num_objects: int = 1, mem_frames: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random frame and a memory of `mem_frames` frames encoded by `network`, shaped as `FrameStep` expects."""
    net = unwrap(network)
    frames = torch.rand(mem_frames + 1, 3, height, width)
    with torch.no_grad():
        key, f16, _, _ = net.encode_key(frames[1:])
        value = net.encode_value(frames[1:], f16, torch.rand(mem_frames, num_objects, height, width))
    mem_key = key.permute(1, 0, 2, 3).flatten(1)[None]  # 1×Ck×(T·h·w)
    mem_value = value.permute(1, 2, 0, 3, 4).flatten(2)[None]  # 1×K×Cv×(T·h·w)
    return frames[:1], mem_key, mem_value


def export_onnx(
    network: nn.Module, path: str | Path, height: int, width: int, num_objects: int = 1, opset_version: int = ONNX_OPSET
) -> Path:
    """Write `FrameStep(network)` (an eager TCMN) for H×W frames and `num_objects` objects to `path`, N dynamic
    (the graph is specialised to H, W, B = 1 and K)."""
    step = FrameStep(network).eval()
    inputs = example_inputs(step.network, height, width, num_objects, mem_frames=2)
    io_spec = (INPUT_NAMES, OUTPUT_NAMES, {"mem_key": {2: "N"}, "mem_value": {3: "N"}})
    Path(path).write_bytes(onnx_bytes(step, inputs, io_spec, opset_version))
    return Path(path)


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m scripts.tools.export`: the shipped (or given) weights' per-frame step as one ONNX file."""
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.export", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="the ONNX file to write")
    parser.add_argument("--ckpt_path", default=None, help="the network weights (default: the variant's shipped ones)")
    parser.add_argument("--variant", default="lite", choices=sorted(VARIANTS), help="the network's size")
    parser.add_argument("--height", type=int, default=288, help="frame height the graph is made for")
    parser.add_argument("--width", type=int, default=384, help="frame width the graph is made for")
    parser.add_argument("--objects", type=int, default=1, help="objects the graph is made for")
    args = parser.parse_args(argv)
    prepare_job()
    network = TCMN(args.variant, pretrained=False)
    load_network_weights(network, args.ckpt_path or weights_file(args.variant))
    path = export_onnx(network.eval(), args.output, args.height, args.width, args.objects)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
