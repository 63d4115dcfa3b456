"""int8 post-training quantization (`python -m scripts.tools.quantize`, `--runtime onnxruntime --quantized FILE`).

Calibration reads only the training sequences and writes a file that loads back equal; the int8 steps built from it
stay close to the float32 network; a file made for other weights, a runtime other than onnxruntime and a file that
is not a calibration are refused in one line; every model config declares and wires `--quantized`.

Tiny synthetic data (DAVIS layout, 64×80) and a random-initialised lite network (seeded). Tolerances, stated as the
relative L2 error ‖int8 − float32‖ / ‖float32‖ (measured with seeds 0-2: key ≤ 0.004, skips ≤ 0.04, the objects'
aggregated logits ≤ 0.08, probabilities within 0.002): key and skips ≤ 0.15, logits ≤ 0.10, probabilities within
0.02 (absolute); the value encoder stays float32 (1e-4 of the largest value, as the float engines). With the
shipped weights on the project's data the key features differ by 5-11 % and J&F stays within 0.01 of float32 (README
"Runtimes"), which these tests cannot check without the data.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser
from test_cli import bundle_command, config_files, run_all, succeeded

from scripts.annotations import read_label_series
from scripts.data import list_sequences
from scripts.errors import InputError
from scripts.flags import check_flags
from scripts.int8 import FLOAT_NODES, Int8Calibration, weights_digest
from scripts.network import TCMN
from scripts.runtime import KEY_IO, KeyStep, RuntimeNetwork, check_quantized, onnx_bytes, runtime_network
from scripts.synthetic import write_echo_dataset
from scripts.tools.quantize import calibrate

pytest.importorskip("onnxruntime")
CONFIGS = REPO / "bundle" / "configs"
FEATURE_TOLERANCE = 0.15  # relative L2 of key, f16, f8, f4
LOGIT_TOLERANCE = 0.10  # relative L2 of the decoder's per-object logits
PROBABILITY_TOLERANCE = 0.02  # absolute, of the probabilities the inferer takes
VALUE_TOLERANCE = 1e-4  # of the largest value: the value encoder stays float32


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three synthetic sequences of 6 frames, 64×80; echo02 is `val` in the split file."""
    root = write_echo_dataset(
        tmp_path_factory.mktemp("echo") / "echo", num_sequences=3, num_frames=6, height=64, width=80
    )
    split = root.parent / "splits.json"
    split.write_text(json.dumps({f"{root.name}/echo02": "val"}))
    return root, split


@pytest.fixture(scope="module")
def net() -> TCMN:
    torch.manual_seed(0)
    return TCMN("lite", pretrained=False).eval()


@pytest.fixture(scope="module")
def calibration(net: TCMN, dataset: tuple[Path, Path]) -> Int8Calibration:
    root, split = dataset
    with torch.inference_mode():
        return calibrate(net, list_sequences(root, "train", split), frames_per_sequence=3)


def frames(dataset: tuple[Path, Path], sequence: str = "echo02") -> torch.Tensor:
    """The val sequence's frames (never calibrated on), T×3×H×W in [0, 1]."""
    from PIL import Image

    folder = dataset[0] / "JPEGImages" / sequence
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_calibration_reads_the_training_sequences_only(calibration: Int8Calibration, dataset, net: TCMN) -> None:
    name = dataset[0].name
    assert calibration.source["sequences"] == [f"{name}/echo00", f"{name}/echo01"]
    # 3 evenly spaced propagated frames of each: their key encoder input and their decoder call
    assert calibration.source["key_frames"] == calibration.source["decoder_calls"] == 6
    assert calibration.variant == "lite" and calibration.weights == weights_digest(net)
    assert set(calibration.ranges) == {"key", "decode"} and all(calibration.ranges.values())
    assert all(lo <= hi for table in calibration.ranges.values() for lo, hi in table.values())


def test_file_round_trip_and_unreadable_files(calibration: Int8Calibration, tmp_path: Path) -> None:
    path = calibration.save(tmp_path / "int8.json")
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n"  # 4-space JSON
    loaded = Int8Calibration.load(path)
    assert (loaded.variant, loaded.weights, loaded.ranges, loaded.path) == (
        calibration.variant,
        calibration.weights,
        calibration.ranges,
        path,
    )
    (tmp_path / "notes.txt").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    broken = {**json.loads(text), "ranges": {"key": {}}}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    for name, phrase in (
        ("missing.json", "no such int8 calibration file"),
        ("notes.txt", "not an int8 calibration file (JSONDecodeError)"),
        ("other.json", "not an int8 calibration file (format"),
        ("broken.json", "an int8 calibration file with missing or malformed entries"),
    ):
        with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / name))}: {re.escape(phrase)}"):
            Int8Calibration.load(tmp_path / name)
    with pytest.raises(InputError, match="no int8 recipe for the full variant"):
        Int8Calibration("full", calibration.weights, calibration.ranges)


def test_int8_steps_stay_close_to_float32(net: TCMN, calibration: Int8Calibration, dataset) -> None:
    """K = 1 and 2, batch 1, on frames of the val sequence; the value encoder is float32, key and decoder int8."""
    torch.manual_seed(2)
    wrapped = RuntimeNetwork(net, "onnxruntime", quantized=calibration)
    images = frames(dataset)[:2].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for t in range(2):
            image = images[t : t + 1]
            expected = net.encode_key(image)
            got = wrapped.encode_key(image)
            for name, out, ref in zip(("key", "f16", "f8", "f4"), got, expected):
                assert relative(out, ref) <= FEATURE_TOLERANCE, (name, relative(out, ref))
            _, f16, f8, f4 = expected
            for k in (1, 2):
                masks = torch.rand(1, k, 64, 80)
                value = net.encode_value(image, f16, masks)
                error = float((wrapped.encode_value(image, f16, masks) - value).abs().max() / value.abs().max())
                assert error <= VALUE_TOLERANCE
                readout = value * 2
                aggregated = wrapped.decode(readout, f16, f8, f4, (64, 80))
                reference = net.decode(readout, f16, f8, f4, (64, 80))
                assert (aggregated.softmax(1) - reference.softmax(1)).abs().max() <= PROBABILITY_TOLERANCE
                raw = torch.logit(torch.sigmoid(aggregated[:, 1:]).clamp(1e-6, 1 - 1e-6))
                ref_raw = torch.logit(torch.sigmoid(reference[:, 1:]).clamp(1e-6, 1 - 1e-6))
                assert relative(raw, ref_raw) <= LOGIT_TOLERANCE, relative(raw, ref_raw)
    assert len(wrapped._graphs) == 3  # one per step at 64×80: K stays dynamic in the int8 graphs


def test_int8_graph_keeps_the_early_layers_float(net: TCMN, calibration: Int8Calibration) -> None:
    """The key graph quantizes the convolutions after the first two blocks (their weights come through
    DequantizeLinear) and leaves the stem and the first two blocks float32, with no unused constants left over."""
    model = onnx_bytes(KeyStep(net), [torch.rand(1, 3, 64, 80)], KEY_IO)
    graph = onnx.load_from_string(calibration.quantize("key", model)).graph
    producers = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    float_prefixes = FLOAT_NODES["lite"]["key"]
    for conv in convs:
        weight = producers.get(conv.input[1])
        quantized = weight is not None and weight.op_type == "DequantizeLinear"
        assert quantized != conv.name.startswith(float_prefixes), conv.name
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 20
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    assert all(i.name in used for i in graph.initializer)
    assert all(set(n.output) & used for n in graph.node if n.op_type == "Constant")
    assert calibration.quantize("value", model) == model  # the value encoder stays float32


def test_other_weights_wrong_runtime_and_wrong_files_are_refused(
    net: TCMN, calibration: Int8Calibration, tmp_path: Path
) -> None:
    path = calibration.save(tmp_path / "int8.json")
    torch.manual_seed(1)
    other = TCMN("lite", pretrained=False).eval()
    image = torch.rand(1, 3, 64, 80)
    with pytest.raises(InputError, match=rf"^--quantized {re.escape(str(path))}: calibrated for other weights"):
        RuntimeNetwork(other, "onnxruntime", quantized=path).encode_key(image)
    own = TCMN("lite", pretrained=False).eval()
    own.load_state_dict(net.state_dict())
    wrapped = RuntimeNetwork(own, "onnxruntime", quantized=path)
    with torch.inference_mode():
        wrapped.encode_key(image)
    own.load_state_dict(other.state_dict())  # new weights in the wrapped network are noticed at the next call
    with pytest.raises(InputError, match="calibrated for other weights"):
        wrapped.encode_key(image)
    for runtime in ("torch", "openvino"):
        expected = f"--quantized {path}: int8 graphs run on onnxruntime; add --runtime onnxruntime"
        with pytest.raises(InputError, match=f"^{re.escape(expected)}$"):
            check_quantized(str(path), runtime)
        if runtime == "torch":
            with pytest.raises(InputError, match=re.escape(expected)):
                RuntimeNetwork(net, runtime, quantized=path)
    check_quantized(None, "torch")
    check_quantized(str(path), "onnxruntime")
    with pytest.raises(InputError, match=f"^--quantized {re.escape(str(tmp_path / 'x.json'))}: no such int8"):
        check_quantized(str(tmp_path / "x.json"), "onnxruntime")
    with pytest.raises(InputError, match="needs the eager network"):
        runtime_network(torch.jit.script(torch.nn.Identity()), "torch", str(path))
    spec = {"value": str(path), "type": "path", "optional": True, "check": lambda v: check_quantized(v, "torch")}
    with pytest.raises(SystemExit, match="^error: --quantized .*: int8 graphs run on onnxruntime; add --runtime"):
        check_flags({"quantized": spec}, argv=[])


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json", "batch_inference.json", "app.json"])
def test_every_model_config_declares_and_wires_the_flag(
    config: str, calibration: Int8Calibration, tmp_path: Path
) -> None:
    path = calibration.save(tmp_path / "int8.json")
    parser = ConfigParser()
    parser.read_config(config_files(config))
    parser.update({"device": "$torch.device('cpu')"})
    assert parser["quantized"] is None
    parser.update({"quantized": str(path), "runtime": "onnxruntime"})
    spec = parser.get_parsed_content("flags")["quantized"]
    assert spec["type"] == "path" and spec["optional"] and "python -m scripts.tools.quantize" in spec["help"]
    spec["check"](str(path))
    parser.update({"runtime": "torch"})
    with pytest.raises(InputError, match="add --runtime onnxruntime"):
        parser.get_parsed_content("flags", lazy=False)["quantized"]["check"](str(path))
    parser.update({"runtime": "onnxruntime"})
    network = parser.get_parsed_content("propagator", lazy=False).network
    assert isinstance(network, RuntimeNetwork) and network.quantized.path == path


@pytest.mark.slow
def test_command_line_calibration_and_int8_inference(dataset, tmp_path: Path) -> None:
    """`python -m scripts.tools.quantize` with the shipped weights on the synthetic training sequences, then the
    inference job with `--runtime onnxruntime --quantized FILE` on the val sequence: labels equal float32's on ≥ 97 %
    of the pixels; an existing output is refused, and so is a dataset whose sequences are all val."""
    root, split = dataset
    output = tmp_path / "int8.json"
    quantize = [sys.executable, "-m", "scripts.tools.quantize", "--dataset_dir", str(root), "--split_file", str(split)]
    results = run_all({"calibrate": [*quantize, "--output", str(output), "--frames_per_sequence", "4"]})
    succeeded(results["calibrate"])
    assert "calibrating on 2 training sequences" in results["calibrate"].stdout
    assert Int8Calibration.load(output).source["split"] == "train"
    all_val = tmp_path / "all_val.json"
    all_val.write_text(json.dumps({f"{root.name}/echo{i:02d}": "val" for i in range(3)}))
    video, mask = root / "JPEGImages" / "echo02", root / "Annotations" / "echo02" / "00000.png"
    common = {"video": video, "mask": mask, "progress": "false"}
    commands = {
        "torch": bundle_command("inference", "inference.json", output_dir=tmp_path / "torch", **common),
        "int8": bundle_command(
            "inference",
            "inference.json",
            output_dir=tmp_path / "int8",
            runtime="onnxruntime",
            quantized=output,
            **common,
        ),
        "exists": [*quantize, "--output", str(output)],
        "all_val": [
            sys.executable,
            "-m",
            "scripts.tools.quantize",
            "--dataset_dir",
            str(root),
            "--split_file",
            str(all_val),
        ]
        + ["--output", str(tmp_path / "x.json")],
        "wrong_runtime": bundle_command(
            "inference", "inference.json", output_dir=tmp_path / "x", quantized=output, **common
        ),
    }
    results = run_all(commands)
    succeeded(results["torch"])
    succeeded(results["int8"])
    name = "echo02_seg.nii.gz"
    agreement = (read_label_series(tmp_path / "int8" / name) == read_label_series(tmp_path / "torch" / name)).mean()
    assert agreement >= 0.97, agreement
    # one line, as the bundle's jobs end (no argparse usage)
    last = results["exists"].stderr.strip().splitlines()[-1]
    assert results["exists"].returncode == 1 and last.startswith("error: --output")
    assert "exists; add --overwrite" in last
    assert "usage:" not in results["exists"].stderr
    last = results["all_val"].stderr.strip().splitlines()[-1]
    assert results["all_val"].returncode == 1 and last.startswith("error: --dataset_dir") and "no training" in last
    last = results["wrong_runtime"].stderr.strip().splitlines()[-1]
    assert last == f"error: --quantized {output}: int8 graphs run on onnxruntime; add --runtime onnxruntime"
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.json").exists()
