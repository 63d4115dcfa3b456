"""ONNX export of one propagation step (key encoding → memory read → decoding) for runtimes without TorchScript.

The whole-clip TCMN is exported to TorchScript by `python -m monai.bundle ckpt_export`; ONNX gets the per-frame step
instead, so a caller keeps its own memory (keys B×Ck×N, values B×K×Cv×N, N = stored frames × h × w) and calls the
model once per query frame. The read is dense (no top-k) in the exported graph; N is a dynamic axis.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from scripts.inferer import unwrap

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
    network: nn.Module, path: str | Path, height: int, width: int, num_objects: int = 1, opset_version: int = 18
) -> Path:
    """Write `FrameStep(network)` (an eager TCMN) for H×W frames and `num_objects` objects to `path`, N dynamic.

    Uses the `torch.export`-based exporter (needs `onnxscript`); the graph is specialised to H, W, B = 1 and K.
    """
    step = FrameStep(network).eval()
    inputs = example_inputs(step.network, height, width, num_objects, mem_frames=2)
    n = torch.export.Dim("N", min=1)
    with torch.no_grad():
        torch.onnx.export(
            step,
            inputs,
            str(path),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset_version,
            dynamo=True,
            verbose=False,
            dynamic_shapes={"frame": None, "mem_key": {2: n}, "mem_value": {3: n}},
            external_data=False,
        )
    return Path(path)
