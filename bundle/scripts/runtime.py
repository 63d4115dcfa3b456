"""The per-frame network steps of a TCMN run by an inference engine: `--runtime torch|openvino|onnxruntime`.

`PropagationState` calls three steps per frame: `encode_key`, `encode_value` (every `mem_every`-th frame) and
`decode`; the memory read between them stays in the bundle's `MemoryBank` (top-k, bounded, evicting), so only the
convolutional parts go to the engine and the memory's rules live in one place. `RuntimeNetwork` wraps an eval-mode
TCMN with the same three methods on CPU float32 tensors, so the inferer runs it unchanged:

- `torch`: the network itself with batch norm folded into the preceding convolutions (`torch.fx`'s `fuse`, on a
  copy): key encoding much faster on CPU (the model card has the numbers), outputs equal within float32 rounding.
- `onnxruntime`: each step exported to ONNX (`torch.onnx.export` with the TorchScript-based exporter: these graphs
  export far faster than with the `torch.export`-based one) and run by an `InferenceSession`.
- `openvino`: the same ONNX graphs read by `Core.read_model` and compiled for CPU with a latency hint and float32
  precision (its default on CPUs with bfloat16 units, bfloat16, changed the sample clip's labels visibly).
- `onnxruntime` with `quantized` (`--quantized FILE`, an int8 calibration written by
  `python -m scripts.tools.quantize`): the key encoder's and the decoder's graphs are quantized to int8 (QDQ) with
  the file's activation ranges as they are built; the value encoder stays float32. See `scripts.int8` for what is
  int8 and why.

The engines' graphs are built on first use for a frame size and kept for the `CACHED_SIZES` sizes used last (a video's
frames share one; the batch job reuses them across videos); the batch and the number of objects K are dynamic axes.
They read the weights when built: a change of the wrapped network's weights or device is noticed at the next call and
the graphs are rebuilt.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.fx.experimental.optimization import fuse

from scripts.errors import InputError
from scripts.int8 import Int8Calibration, load_calibration
from scripts.network import TCMN, aggregate

RUNTIMES = ("torch", "openvino", "onnxruntime")
PACKAGES = {"torch": (), "openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx")}  # onnx: the export
ONNX_OPSET = 17
CACHED_SIZES = 4  # frame sizes whose graphs are kept (3 graphs each, ~6 MB for lite): a batch of odd sizes stays flat
# what each step's graph takes and gives, and which axes vary: batch B and objects K (sizes are fixed per graph)
BATCH, OBJECTS = {0: "B"}, {0: "B", 1: "K"}
KEY_IO = (["image"], ["key", "f16", "f8", "f4"], dict.fromkeys(["image", "key", "f16", "f8", "f4"], BATCH))
VALUE_IO = (["image", "f16", "masks"], ["value"], {"image": BATCH, "f16": BATCH, "masks": OBJECTS, "value": OBJECTS})
DECODE_IO = (
    ["readout", "f16", "f8", "f4"],
    ["logits"],
    {**dict.fromkeys(["f16", "f8", "f4"], BATCH), "readout": OBJECTS, "logits": OBJECTS},
)


def runtime_problem(runtime: str, device: str | torch.device = "cpu") -> str | None:
    """Why `runtime` cannot run on `device` here (None: it can), in the words of a flag error."""
    if runtime not in RUNTIMES:
        return f"unknown runtime; choose one of {', '.join(RUNTIMES)}"
    for package in PACKAGES[runtime]:
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed (pip install {package})"
    if runtime != "torch" and torch.device(device).type != "cpu":
        return f"{runtime} runs on the CPU here; use --device cpu, or --runtime torch on {torch.device(device).type}"
    return None


def check_quantized(quantized: str | None, runtime: str = "onnxruntime") -> None:
    """The `--quantized` flag's check: none, or an int8 calibration file that loads, with `--runtime onnxruntime`
    (the int8 graphs are onnxruntime's); one-line `InputError` otherwise. The weights are checked against the file
    when the graphs are built (after `--ckpt_path` is loaded)."""
    if quantized is None or quantized == "":
        return
    if runtime != "onnxruntime":
        raise InputError(f"--quantized {quantized}: int8 graphs run on onnxruntime; add --runtime onnxruntime")
    try:
        Int8Calibration.load(quantized)
    except InputError as err:  # its message starts with the path
        raise InputError(f"--quantized {err}") from None


def check_runtime(runtime: str, device: str | torch.device = "cpu") -> None:
    """Raise a one-line `InputError` naming the flag when `runtime` cannot run on `device` (the configs' flag check
    calls it before any work, so a missing package is not found only when the first frame is encoded)."""
    problem = runtime_problem(runtime, device)
    if problem is not None:
        raise InputError(f"--runtime {runtime}: {problem}")


class KeyStep(nn.Module):
    """`TCMN.encode_key` as a module of its own parts, so tracing sees neither the memory read nor TorchScript
    exports."""

    def __init__(self, network: TCMN) -> None:
        super().__init__()
        self.key_encoder = network.key_encoder
        self.key_proj = network.key_proj

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f16, f8, f4 = self.key_encoder(image)
        return self.key_proj(f16), f16, f8, f4


class ValueStep(nn.Module):
    """`TCMN.encode_value` as a module of its own."""

    def __init__(self, network: TCMN) -> None:
        super().__init__()
        self.value_encoder = network.value_encoder

    def forward(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.value_encoder(image, f16, masks)


class DecodeStep(nn.Module):
    """The decoder of `TCMN.decode` for one output size: per-object logits B×K×H×W. The soft aggregation stays in
    torch: near saturation its logits magnify float32 differences between engines (1 - p of p ≈ 1 - 1e-7) for no
    gain in probability, and `valid` stays the network's own argument."""

    def __init__(self, network: TCMN, size: tuple[int, int]) -> None:
        super().__init__()
        self.decoder = network.decoder
        self.size = size

    def forward(self, readout: torch.Tensor, f16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        return self.decoder(readout, f16, f8, f4, self.size)


def fold_batch_norm(network: TCMN) -> TCMN:
    """A copy of an eval-mode TCMN whose encoders have each batch norm folded into the convolution before it
    (`torch.fx.experimental.optimization.fuse`); the caller's network is left as it is."""
    folded = copy.deepcopy(network).eval()
    folded.key_encoder = fuse(folded.key_encoder)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.value_encoder.modules()):
        folded.value_encoder = fuse(folded.value_encoder)  # the full variant's ResNet-18 mask encoder
    return folded


def onnx_bytes(step: nn.Module, inputs: Sequence[torch.Tensor], io_spec: tuple, opset: int = ONNX_OPSET) -> bytes:
    """`step` exported to ONNX in memory, the axes `io_spec` names dynamic (the bundle's one ONNX exporter: the
    runtimes' per-frame graphs and `scripts.tools.export`)."""
    names, outputs, dynamic = io_spec
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")  # on purpose
        torch.onnx.export(
            step.eval(),
            tuple(inputs),
            buffer,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


class OnnxRuntimeGraph:
    """One step's graph in an onnxruntime `InferenceSession` (all graph optimisations, `threads` intra-op)."""

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle workers sleep instead of spinning: between steps torch runs the memory read on the same cores, and
        # spinning workers made a propagated frame 2-3× slower (measured on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]  # the exporter drops inputs a graph does not read

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {name: feeds[name] for name in self.inputs})


class OpenVinoGraph:
    """One step's graph compiled by OpenVINO for CPU: latency hint, float32, `threads` inference threads.

    The ONNX bytes are read by `Core.read_model` rather than `openvino.convert_model`: the same graph ten times
    faster, and `convert_model` also starts threads that send usage telemetry, which a clinical tool must not.
    """

    def __init__(self, model: bytes, threads: int) -> None:
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        core = openvino_core()
        compiled = core.compile_model(core.read_model(model), "CPU", config)
        self.request = compiled.create_infer_request()
        # an input tensor may carry several names (a constant-folded reshape's too): take the one the export gave
        self.inputs = [next(n for n in sorted(i.get_names()) if not n.startswith("/")) for i in compiled.inputs]
        self.outputs = compiled.outputs

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer({name: feeds[name] for name in self.inputs})
        return [result[output] for output in self.outputs]


@functools.cache
def openvino_core():
    """The process's one OpenVINO `Core` (it holds the plugins; graphs of every size share it)."""
    import openvino as ov

    return ov.Core()


ENGINES: dict[str, Callable[[bytes, int], Callable[[dict[str, np.ndarray]], list[np.ndarray]]]] = {
    "onnxruntime": OnnxRuntimeGraph,
    "openvino": OpenVinoGraph,
}


class RuntimeNetwork(nn.Module):
    """An eval-mode TCMN whose per-frame steps run on `runtime`, with TCMN's `encode_key`, `encode_value`, `decode`
    (and `read`, which stays the network's), so `PropagationState` and `ModelPropagator` take it in its place.

    The wrapped network stays a submodule (`.to()`, `.eval()` and `state_dict` reach it) and is never modified.
    Engine graphs (per frame size) and the folded copy (`torch`) are made at first use from its weights then, and
    made again when its parameters change (load_state_dict, an optimiser step, a move). `threads` (default torch's
    count when a graph is built) is each engine's intra-op thread count. Engines take and give CPU float32 tensors.
    `quantized` (onnxruntime only): an int8 calibration (`scripts.int8.Int8Calibration` or its file) whose steps
    are built as int8 graphs; it must have been made for the wrapped network's weights (checked at each build).
    """

    def __init__(
        self,
        network: nn.Module,
        runtime: str = "torch",
        threads: int | None = None,
        quantized: str | Path | Int8Calibration | None = None,
    ) -> None:
        super().__init__()
        check_runtime(runtime)
        if not isinstance(network, TCMN):
            raise TypeError(f"RuntimeNetwork wraps an eager TCMN, got {type(network).__name__}")
        if quantized is not None and quantized != "" and runtime != "onnxruntime":
            name = quantized.name if isinstance(quantized, Int8Calibration) else quantized
            raise InputError(f"--quantized {name}: int8 graphs run on onnxruntime; add --runtime onnxruntime")
        self.network = network
        self.runtime = runtime
        self.threads = threads
        self.quantized = load_calibration(quantized)
        self._checked: tuple | None = None  # the weights fingerprint the calibration was last checked against
        self._graphs: OrderedDict[tuple, Callable] = OrderedDict()  # oldest used first
        self._folded: TCMN | None = None
        self._tensors: list[torch.Tensor] = []
        self._fingerprint: tuple = ()

    @property
    def variant(self) -> str:
        return self.network.variant

    def reset(self) -> None:
        """Forget the graphs and the folded copy: the next call builds them from the network's weights."""
        self._graphs.clear()
        self._folded = None
        self._tensors = list(itertools.chain(self.network.parameters(), self.network.buffers()))
        self._fingerprint = self._weights()

    def _weights(self) -> tuple:
        """Where the weights live and how often they were changed in place (tens of µs, checked every call)."""
        return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in self._tensors)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RuntimeNetwork:
        """`.to()`, `.cuda()`, `.float()`: a non-torch runtime stays on the CPU, and every graph is rebuilt."""
        out = super()._apply(fn, recurse)
        if self.runtime != "torch" and any(t.device.type != "cpu" for t in self.network.parameters()):
            raise InputError(f"--runtime {self.runtime}: {runtime_problem(self.runtime, 'cuda')}")
        self.reset()
        return out

    def _current(self) -> None:
        """Rebuild everything when the network's weights changed since the graphs were made."""
        if not self._tensors or self._weights() != self._fingerprint:
            self.reset()

    def folded(self) -> TCMN:
        """The batch-norm-folded copy the `torch` runtime runs."""
        self._current()
        if self._folded is None:
            self._folded = fold_batch_norm(self.network)
        return self._folded

    def _graph(self, key: tuple, step: Callable[[], nn.Module], inputs: Sequence[torch.Tensor], io_spec: tuple):
        """The engine graph cached under `key`, exported from `step()` with `inputs` as example on first use."""
        self._current()
        graph = self._graphs.get(key)
        if graph is None:
            threads = self.threads or torch.get_num_threads()
            model = onnx_bytes(step(), [t.float() for t in inputs], io_spec)
            if self.quantized is not None:
                if self._checked != self._fingerprint:
                    self.quantized.check(self.network)
                    self._checked = self._fingerprint
                model = self.quantized.quantize(key[0], model)
            graph = ENGINES[self.runtime](model, threads)
            self._graphs[key] = graph
            while len(self._graphs) > 3 * CACHED_SIZES:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph

    def encode_key(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """image B×3×H×W in [0, 1] → key B×Ck×h×w and skips f16, f8, f4."""
        if self.runtime == "torch":
            return self.folded().encode_key(image)
        graph = self._graph(("key", *image.shape[-2:]), lambda: KeyStep(self.network), [image], KEY_IO)
        key, f16, f8, f4 = run(graph, KEY_IO, [image])
        return key, f16, f8, f4

    def encode_value(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Object masks B×K×H×W (probabilities) → values B×K×Cv×h×w."""
        if self.runtime == "torch":
            return self.folded().encode_value(image, f16, masks)
        key = ("value", *image.shape[-2:], *f16.shape[-2:])
        graph = self._graph(key, lambda: ValueStep(self.network), [image, f16, masks], VALUE_IO)
        return run(graph, VALUE_IO, [image, f16, masks])[0]

    def read(self, *args, **kwargs) -> torch.Tensor:
        """The memory read is the network's own (the inferer reads through its `MemoryBank` instead)."""
        return self.network.read(*args, **kwargs)

    def decode(
        self,
        readout: torch.Tensor,
        f16: torch.Tensor,
        f8: torch.Tensor,
        f4: torch.Tensor,
        size: tuple[int, int],
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Readout B×K×Cv×h×w → aggregated logits B×(K+1)×H×W (channel 0 background)."""
        if self.runtime == "torch":
            return self.folded().decode(readout, f16, f8, f4, size, valid)
        size = (int(size[0]), int(size[1]))
        inputs = [readout, f16, f8, f4]
        key = ("decode", *size, *(d for t in (f16, f8, f4) for d in t.shape[-2:]))
        graph = self._graph(key, lambda: DecodeStep(self.network, size), inputs, DECODE_IO)
        return aggregate(run(graph, DECODE_IO, inputs)[0], valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`TCMN.forward` (a whole clip, for export and shape checks), by the network itself."""
        return self.network(x)


def run(graph: Callable[[dict[str, np.ndarray]], list[np.ndarray]], io_spec: tuple, inputs: Sequence[torch.Tensor]):
    """Feed CPU float32 tensors to an engine graph by name and return its outputs as tensors (no copies back)."""
    names = io_spec[0]
    feeds = {name: t.detach().float().contiguous().numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(np.asarray(out)) for out in graph(feeds)]


def runtime_network(
    network: nn.Module, runtime: str = "torch", quantized: str | Path | Int8Calibration | None = None
) -> nn.Module:
    """What the configs hand the propagator: an eager TCMN wrapped for `runtime` (and `--quantized`); a TorchScript
    module (`inference_torchscript.json`) runs as it is under `torch` and is refused by the other runtimes."""
    if isinstance(network, TCMN):
        return RuntimeNetwork(network, runtime, quantized=quantized)
    check_runtime(runtime)
    if quantized is not None and quantized != "":
        raise InputError(
            f"--quantized {quantized}: needs the eager network (--ckpt_path), not {type(network).__name__}"
        )
    if runtime != "torch":
        raise InputError(f"--runtime {runtime}: needs the eager network (--ckpt_path), not {type(network).__name__}")
    return network
