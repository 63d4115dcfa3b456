"""The int8 calibration file of `--runtime onnxruntime --quantized FILE`, and the quantization of a step's graph.

`python -m scripts.tools.quantize` writes the file: the activation range (min, max) of every tensor of the key
encoder's and the decoder's ONNX graphs, measured by onnxruntime's MinMax calibrator while the float32 network
propagates training sequences. The file also names the variant and the SHA-256 of the weights it was calibrated for.

`--runtime onnxruntime --quantized FILE` (inference, batch inference, evaluation, app) then quantizes each step's
graph when `RuntimeNetwork` builds it for a frame size: QDQ, activations uint8 (asymmetric), weights int8 per output
channel in 7 bits (`reduce_range`: onnxruntime's 8-bit kernels saturate on CPUs without VNNI), the ranges from
the file; so one file serves every frame size, and the graphs stay as they are built
today (per size, batch and K dynamic). What is int8 and what stays float32 was chosen on the training split (J&F of
the propagation, cvc_clinicdb and vocalfolds `train`; the model card has the numbers):

- key encoder (`lite`): int8 except the input scaling, the stem and the first two MBConv blocks (`stage4.0`,
  `stage4.1.1`): the high-resolution early features carry a quantization error into every later layer.
- decoder: int8.
- value encoder: float32 (it runs on every `mem_every`-th frame only, and int8 changed its values markedly).

A file made for other weights (another checkpoint, variant or a retrained model) is refused when the graphs are
built, naming both digests, instead of running with ranges that do not fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scripts.errors import InputError

FORMAT = "tcmn-int8-calibration/1"
INT8_STEPS = ("key", "decode")  # the value encoder stays float32
# graph nodes (by name prefix) that stay float32 in each step's int8 graph, per variant; a variant missing here has
# no measured int8 recipe and is refused
FLOAT_NODES: dict[str, dict[str, tuple[str, ...]]] = {
    "lite": {
        "key": (
            "/key_encoder/Mul",
            "/key_encoder/Sub",
            "/key_encoder/stem/",
            "/key_encoder/stage4/stage4.0/",
            "/key_encoder/stage4/stage4.1/stage4.1.1/",
        ),
        "decode": (),
    }
}


def weights_digest(network: torch.nn.Module) -> str:
    """SHA-256 of a network's state dict (names, dtypes, shapes and values; memory format does not count)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Int8Calibration:
    """What `--quantized FILE` holds: per int8 step, the (min, max) of each tensor of its graph, for the weights of
    digest `weights` (variant `variant`); `source` says what it was measured on, `path` where it was read from."""

    variant: str
    weights: str
    ranges: dict[str, dict[str, tuple[float, float]]]
    source: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.variant not in FLOAT_NODES:
            raise InputError(
                f"{self.path or 'int8 calibration'}: no int8 recipe for the {self.variant} variant "
                f"(measured: {', '.join(FLOAT_NODES)})"
            )

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "int8 calibration"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "variant": self.variant,
            "weights_sha256": self.weights,
            "activations": "uint8 per tensor (asymmetric, MinMax)",
            "weights": "int8 per output channel (symmetric)",
            "float32_nodes": {step: list(FLOAT_NODES[self.variant][step]) for step in INT8_STEPS},
            "source": self.source,
            "ranges": {step: {k: list(v) for k, v in sorted(r.items())} for step, r in self.ranges.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the file (4-space JSON) in one piece: a partial file never replaces a good one."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.partial")
        temporary.write_text(json.dumps(self.to_json(), indent=4) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Int8Calibration:
        """Read a file written by `save`; anything else raises a one-line `InputError` naming it."""
        path = Path(path)
        hint = "make one with python -m scripts.tools.quantize"
        if not path.is_file():
            raise InputError(f"{path}: no such int8 calibration file; {hint}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: not an int8 calibration file ({type(err).__name__}); {hint}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{path}: not an int8 calibration file (format {FORMAT!r} expected); {hint}")
        try:
            ranges = {
                step: {str(k): (float(lo), float(hi)) for k, (lo, hi) in data["ranges"][step].items()}
                for step in INT8_STEPS
            }
            return cls(str(data["variant"]), str(data["weights_sha256"]), ranges, dict(data.get("source", {})), path)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"{path}: an int8 calibration file with missing or malformed entries; {hint}") from err

    def check(self, network: torch.nn.Module) -> None:
        """Raise an `InputError` unless this calibration was made for `network`'s variant and weights."""
        variant = getattr(network, "variant", None)
        digest = weights_digest(network)
        if variant != self.variant or digest != self.weights:
            raise InputError(
                f"--quantized {self.name}: calibrated for other weights ({self.variant}, sha256 {self.weights[:12]}…; "
                f"the network is {variant}, sha256 {digest[:12]}…); calibrate again for these weights with "
                "python -m scripts.tools.quantize"
            )

    def quantize(self, step: str, model: bytes) -> bytes:
        """A step's float32 ONNX graph → its int8 (QDQ) graph with this file's ranges; other steps unchanged."""
        if step not in INT8_STEPS:
            return model
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

        graph = onnx.load_from_string(model).graph
        produced = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
        ranges = self.ranges[step]
        if not produced & set(ranges):
            raise InputError(
                f"--quantized {self.name}: its {step} ranges name none of this graph's tensors (made with another "
                "exporter?); calibrate again with python -m scripts.tools.quantize"
            )
        keep = FLOAT_NODES[self.variant][step]
        excluded = [node.name for node in graph.node if keep and node.name.startswith(keep)]
        table = {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items() if k in produced}
        with tempfile.TemporaryDirectory(prefix="tcmn-int8-") as folder, quiet_quantizer():
            source, target, cache = (Path(folder) / name for name in ("float.onnx", "int8.onnx", "ranges.json"))
            source.write_bytes(model)
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, table), cache)
            quantize_static(
                source,
                target,
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=cache,
            )
            quantized = onnx.load(target)
        # the quantizer folds ReLU6 into the QuantizeLinear after a convolution and leaves its bounds (constants)
        # behind, which onnxruntime would list one warning line each when the session is made
        graph = quantized.graph
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        for node in [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]:
            graph.node.remove(node)
        for initializer in [i for i in graph.initializer if i.name not in used]:
            graph.initializer.remove(initializer)
        return quantized.SerializeToString()


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs advice on the root logger (pre-processing, opset) at every graph built."""

    def outside(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(outside)
    try:
        yield
    finally:
        root.removeFilter(outside)


def load_calibration(quantized: str | Path | Int8Calibration | None) -> Int8Calibration | None:
    """`--quantized`'s value (none, a path or a loaded calibration) → the calibration."""
    if quantized is None or quantized == "":
        return None
    if isinstance(quantized, Int8Calibration):
        return quantized
    return Int8Calibration.load(quantized)
