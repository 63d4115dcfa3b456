"""`--runtime`: the per-frame steps run by onnxruntime and OpenVINO (real engines) and by the batch-norm-folded torch
network equal the PyTorch TCMN's, alone and over a whole propagation; the configs wire the flag, and a runtime that is
unknown, not installed or asked for CUDA is refused in one line before any work.

The shipped lite weights are used (not random ones), so activations have their real magnitudes and the tolerances
mean something. Tolerances: key, skips and values within 1e-4 of the reference's largest magnitude (the engines'
float32 differences are about 1e-6 of it here, as are the decoder's logits); decode's aggregated logits within 1e-3
(relative and absolute: the aggregation's log(p / (1 - p)) magnifies rounding where p nears 0 or 1) and their
probabilities within 1e-4; label maps of a whole propagation equal on at least 99.5 % of pixels.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE, SAMPLE_SEQUENCE
from monai.bundle import ConfigParser
from PIL import Image
from test_cli import bundle_command, config_files, run_all, succeeded

import scripts.runtime
from scripts.annotations import read_label_series
from scripts.errors import InputError
from scripts.flags import check_flags
from scripts.inferer import ModelPropagator, PropagationInferer, unwrap
from scripts.memory import MemoryBank
from scripts.network import TCMN, load_network_weights
from scripts.runtime import RUNTIMES, RuntimeNetwork, check_runtime, fold_batch_norm, runtime_network

WEIGHTS = REPO / "bundle" / "models" / "model.pt"
CONFIGS = REPO / "bundle" / "configs"
STEP_TOLERANCE = 1e-4  # of the reference output's largest magnitude
PROBABILITY_TOLERANCE = 1e-4  # absolute, of the probabilities the inferer takes from the aggregated logits
AGGREGATED_TOLERANCE = 1e-3  # relative and absolute: log(p / (1 - p)) near saturation magnifies float32 rounding
LABEL_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def net() -> Iterator[TCMN]:
    """The shipped lite network, eval mode, as the inference job loads it (denormals flushed, as every job does)."""
    torch.set_flush_denormal(True)
    yield load_network_weights(TCMN("lite", pretrained=False), WEIGHTS).eval()
    torch.set_flush_denormal(False)


def engine(runtime: str) -> None:
    """Skip visibly where an engine of the `dev` extra is not installed."""
    for package in scripts.runtime.PACKAGES[runtime]:
        pytest.importorskip(package)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32, (what, out.shape, ref.shape, out.dtype)
    error = float((out - ref).abs().max() / ref.abs().max())
    assert error <= STEP_TOLERANCE, f"{what}: max difference {error:.1e} of the largest value"


def sample_clip(frames: int, height: int, width: int, annotated: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """The embedded sample's first frames resized to height×width, and the annotation of frame `annotated` (5
    objects, values 1, 2, 3, 5, 6)."""
    root = SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE
    images = [
        np.asarray(Image.open(root / f"{t:05d}.jpg").convert("RGB").resize((width, height), Image.BILINEAR))
        for t in range(frames)
    ]
    label = Image.open(SAMPLE / "Annotations" / SAMPLE_SEQUENCE / f"{annotated:05d}.png")
    return images, np.asarray(label.resize((width, height), Image.NEAREST))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_step_equals_the_pytorch_network(net: TCMN, runtime: str) -> None:
    """encode_key, encode_value and decode (with and without `valid`) for K = 1 and 3 objects and a batch of 2, on
    real frames; one graph per step serves every K and batch size."""
    engine(runtime)
    wrapped = RuntimeNetwork(net, runtime)
    images, label = sample_clip(2, 64, 96)
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        for batch, k in ((1, 1), (1, 3), (2, 3)):
            frames = image[:batch].contiguous(memory_format=torch.channels_last)
            masks = torch.stack([torch.from_numpy(label == v).float() for v in (1, 2, 5)[:k]])[None].repeat(
                batch, 1, 1, 1
            )
            expected = net.encode_key(frames)
            got = wrapped.encode_key(frames)
            for name, out, ref in zip(("key", "f16", "f8", "f4"), got, expected):
                assert_close(out, ref, f"{runtime} {name}")
            key, f16, f8, f4 = expected
            value = net.encode_value(frames, f16, masks)
            assert_close(wrapped.encode_value(frames, f16, masks), value, f"{runtime} value K={k}")
            readout = value * 2  # a readout of the magnitude memory reads give
            valid = torch.tensor([[True] + [False] * (k - 1)] * batch)
            for v in (None, valid):
                logits = net.decode(readout, f16, f8, f4, (64, 96), v)
                out = wrapped.decode(readout, f16, f8, f4, (64, 96), v)
                torch.testing.assert_close(out, logits, rtol=AGGREGATED_TOLERANCE, atol=AGGREGATED_TOLERANCE)
                assert (out.softmax(1) - logits.softmax(1)).abs().max() <= PROBABILITY_TOLERANCE
    if runtime != "torch":
        assert len(wrapped._graphs) == 3  # key, value and decode at 64×96: K and the batch are dynamic axes


def test_batch_norm_folding_leaves_no_batch_norm_and_the_callers_network_untouched(net: TCMN) -> None:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 0
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    image = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        for name, out, ref in zip(("key", "f16", "f8", "f4"), folded.encode_key(image), net.encode_key(image)):
            assert_close(out, ref, f"folded {name}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_propagation_gives_the_pytorch_labels(net: TCMN, runtime: str) -> None:
    """A whole two-way propagation through `PropagationInferer` and a `MemoryBank` (writes every 2nd frame, top-k
    read): the label maps equal the plain network's on ≥ 99.5 % of pixels."""
    engine(runtime)
    images, label = sample_clip(8, 96, 128, annotated=3)
    values = np.unique(label)[1:]
    dense = torch.from_numpy(np.searchsorted(values, label) * (label > 0))
    frames = [torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255 for f in images]
    inferer = PropagationInferer(partial(MemoryBank, mem_size=2, top_k=20), mem_every=2)
    labels = {}
    for name, network in (("pytorch", net), (runtime, RuntimeNetwork(net, runtime))):
        out = inferer.propagate(network, frames.__getitem__, len(frames), {3: dense})
        labels[name] = np.stack([prob.argmax(0).numpy() for _, prob in sorted(out, key=lambda item: item[0])])
    agreement = (labels[runtime] == labels["pytorch"]).mean()
    assert agreement >= LABEL_AGREEMENT, f"{runtime}: {agreement:.4f} of the pixels equal"
    assert len(np.unique(labels["pytorch"])) > 2  # the objects survive: not a trivially equal background


def test_wrapper_runs_in_the_model_propagator_and_rebuilds_after_new_weights(
    net: TCMN, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ModelPropagator` moves it to channels_last and eval mode, `unwrap` leaves it in place, graphs are kept per
    frame size across videos (the last `CACHED_SIZES` sizes), and loading other weights into the wrapped network is
    noticed."""
    pytest.importorskip("onnxruntime")
    own = copy.deepcopy(net)
    wrapped = RuntimeNetwork(own, "onnxruntime")
    propagator = ModelPropagator(wrapped, PropagationInferer(partial(MemoryBank, mem_size=2), mem_every=2))
    assert propagator.network is wrapped and unwrap(wrapped) is wrapped and not wrapped.training
    assert own.key_proj.weight.is_contiguous(memory_format=torch.channels_last)
    images, label = sample_clip(4, 64, 96)
    first = dict(propagator.propagate(images, {0: label}))
    assert len(wrapped._graphs) == 3
    again = dict(propagator.propagate(images[::-1], {0: label}))  # another video of the same size
    assert len(wrapped._graphs) == 3 and sorted(again) == sorted(first) == list(range(4))
    small, small_label = sample_clip(3, 48, 64)
    dict(propagator.propagate(small, {0: small_label}))
    assert len(wrapped._graphs) == 6
    monkeypatch.setattr(scripts.runtime, "CACHED_SIZES", 1)  # a new size's graphs push the older sizes' out
    tiny, tiny_label = sample_clip(2, 32, 48)
    dict(propagator.propagate(tiny, {0: tiny_label}))
    assert sorted({key[1:3] for key in wrapped._graphs}) == [(32, 48)] and len(wrapped._graphs) == 3
    torch.manual_seed(1)
    other = TCMN("lite", pretrained=False).eval()
    own.load_state_dict(other.state_dict())
    image = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        assert_close(wrapped.encode_key(image)[0], other.encode_key(image)[0], "key after new weights")
    assert len(wrapped._graphs) == 1


def test_unknown_missing_or_misplaced_runtimes_are_refused_in_one_line(
    net: TCMN, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InputError, match=r"^--runtime tensorrt: unknown runtime; choose one of torch, openvino, "):
        RuntimeNetwork(net, "tensorrt")
    with pytest.raises(InputError, match=r"^--runtime onnxruntime: onnxruntime runs on the CPU here; use --device"):
        check_runtime("onnxruntime", "cuda")
    check_runtime("torch", "cuda")
    with pytest.raises(InputError, match="needs the eager network"):
        runtime_network(torch.jit.script(torch.nn.Identity()), "openvino")
    flags = ConfigParser.load_config_file(str(CONFIGS / "inference.json"))["model_flags"]
    assert flags["runtime"]["choices"] == "$list(scripts.runtime.RUNTIMES)"
    spec = {**flags["runtime"], "value": "openvino", "choices": list(RUNTIMES), "check": check_runtime}
    check_flags({"runtime": spec}, argv=[])
    monkeypatch.setitem(sys.modules, "openvino", None)  # what Python does for a package that cannot be imported
    expected = "error: --runtime openvino: the openvino package is not installed (pip install openvino)"
    with pytest.raises(SystemExit, match=f"^{re.escape(expected)}$"):
        check_flags({"runtime": spec}, argv=[])
    with pytest.raises(InputError, match="not installed"):
        RuntimeNetwork(net, "openvino")


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json", "batch_inference.json", "app.json"])
def test_every_model_config_declares_the_flag(config: str) -> None:
    """Every model job (a layer over inference.json, or inference.json itself) has the flag and wires it."""
    parser = ConfigParser()
    parser.read_config(config_files(config))
    parser.update({"device": "$torch.device('cpu')"})
    assert parser["runtime"] == "torch"
    spec = parser.get_parsed_content("flags")["runtime"]
    assert spec["type"] == "choice" and spec["choices"] == list(RUNTIMES)
    spec["check"]("onnxruntime")
    parser.update({"runtime": "onnxruntime"})
    network = parser.get_parsed_content("propagator").network
    assert isinstance(network, RuntimeNetwork) and network.runtime == "onnxruntime"


@pytest.mark.slow
def test_command_line_runtimes(tmp_path: Path) -> None:
    """`python -m monai.bundle run inference --runtime …` on the sample clip (shipped weights, `--size 128`): the
    engines' labels equal torch's on ≥ 99.5 % of pixels; an unknown runtime and one whose package cannot be imported
    end with one line and exit status 1, writing nothing."""
    for runtime in RUNTIMES:
        engine(runtime)
    commands = {
        rt: bundle_command(
            "inference", "inference.json", output_dir=tmp_path / rt, size=128, progress="false", runtime=rt
        )
        for rt in RUNTIMES
    }
    commands["unknown"] = bundle_command("inference", "inference.json", output_dir=tmp_path / "x", runtime="tensorrt")
    # `python -m monai.bundle run …` in a process where openvino cannot be imported (as where it is not installed)
    hide = "import runpy, sys; sys.modules['openvino'] = None; sys.argv[0] = 'monai.bundle'; "
    hide += "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)"
    missing = bundle_command("inference", "inference.json", output_dir=tmp_path / "x", runtime="openvino")
    commands["missing"] = [sys.executable, "-c", hide, *missing[3:]]
    results = run_all(commands)
    name = f"{SAMPLE_SEQUENCE}_seg.nii.gz"
    for rt in RUNTIMES:
        succeeded(results[rt])
    torch_labels = read_label_series(tmp_path / "torch" / name)
    for rt in RUNTIMES[1:]:
        agreement = (read_label_series(tmp_path / rt / name) == torch_labels).mean()
        assert agreement >= LABEL_AGREEMENT, f"{rt}: {agreement:.4f}"
    for case, line in (
        ("unknown", "error: --runtime tensorrt: one of torch, openvino, onnxruntime"),
        ("missing", "error: --runtime openvino: the openvino package is not installed (pip install openvino)"),
    ):
        result = results[case]
        assert result.returncode == 1, (case, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1] == line and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()
