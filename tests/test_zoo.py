"""Model Zoo readiness: metadata against the vendored schema, network I/O, TorchScript and ONNX export, style."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from scripts.network import TCMN
from scripts.tools.export import FrameStep, export_onnx

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
METADATA = CONFIGS / "metadata.json"
SCHEMA = CONFIGS / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"  # the vendored schema, byte for byte as MONAI-extra-test-data 0.8.1
INFERENCE = CONFIGS / "inference.json"
LOCK = REPO / "constraints.txt"
INSTALL = 'pip install -c constraints.txt -e ".[dev]"'
TEST_COMMAND = 'python -m pytest -q -m "slow or not slow"'
SAMPLE = BUNDLE / "sample" / "vocalfolds"
SEQUENCE = "patient2_seq7"
# every download attempt fails fast: the checks below must not need the network
OFFLINE = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}


def monai_bundle(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m monai.bundle <args>` from the repository root with this checkout's `scripts`, offline."""
    env = {**os.environ, **OFFLINE, "no_proxy": "", "NO_PROXY": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def sample_clip(num_frames: int, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The first frames of the embedded sample resized to size×size, and frame 0's vocal folds (label 1) as object 1."""
    frames = [
        np.asarray(Image.open(SAMPLE / "JPEGImages" / SEQUENCE / f"{t:05d}.jpg").resize((size, size), Image.BILINEAR))
        for t in range(num_frames)
    ]
    label = Image.open(SAMPLE / "Annotations" / SEQUENCE / "00000.png").resize((size, size), Image.NEAREST)
    mask = (np.asarray(label) == 1).astype(np.uint8)
    assert mask.any() and not mask.all()
    return frames, mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict with the ImageNet key encoder and the rest freshly initialised (seeded)."""
    path = tmp_path_factory.mktemp("zoo") / "model.pt"
    torch.manual_seed(0)
    torch.save(TCMN("lite", pretrained=True).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> dict[str, Path]:
    """The checkpoint and its TorchScript export by `monai.bundle ckpt_export` (scripted, not traced)."""
    ts = checkpoint.with_suffix(".ts")
    # fmt: off
    monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(checkpoint),
        "--meta_file", str(METADATA), "--config_file", str(INFERENCE), "--key_in_ckpt", "",
    )
    # fmt: on
    return {"ckpt": checkpoint, "ts": ts}


def eager_network(ckpt: Path) -> TCMN:
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return net.eval()


def locked_versions() -> dict[str, str]:
    """The lock's pins, by name as pip compares names; every line that is not a comment must be `name==version`."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][0-9A-Za-z.]*)", line.strip())
            assert match, f"{LOCK}: {line!r} is not an exact pin"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_metadata_fields_match_environment() -> None:
    """metadata.json pins exactly what the lock installs, and this environment is the locked one."""
    meta = json.loads(METADATA.read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert meta["schema"].endswith("/" + SCHEMA.name)
    assert meta["version"] in meta["changelog"]
    pinned = {
        "monai": meta["monai_version"],
        "torch": meta["pytorch_version"],
        "numpy": meta["numpy_version"],
        **meta["required_packages_version"],
    }
    lock = locked_versions()
    assert {name: lock.get(canonicalize_name(name)) for name in pinned} == pinned, "metadata.json and the lock differ"
    installed = {name: version(name).split("+")[0] for name in pinned}
    assert installed == pinned, f"this environment is not the locked one; install it with {INSTALL}"
    # MONAI renames the deprecated `optional_packages_version` to `required_packages_version`, dropping the latter
    assert "optional_packages_version" not in meta
    broken = {k: v for k, v in meta.items() if k != "network_data_format"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def test_quickstart_and_ci_install_the_lock() -> None:
    """The lock pins every requirement of the project and its dev extra (torch at 2.13.0) to a version that meets it,
    the README's Quickstart is its two commands, each installing from the lock, and CI installs from the lock into a
    fresh venv and runs the README's test command there."""
    lock = locked_versions()
    assert lock["torch"] == "2.13.0"
    wanted = [Requirement(r) for r in requires("tcmn-bundle")]
    wanted = [r for r in wanted if r.marker is None or r.marker.evaluate({"extra": "dev"})]
    assert len(wanted) > 30
    for requirement in wanted:
        pinned = lock.get(canonicalize_name(requirement.name))
        assert pinned is not None and requirement.specifier.contains(pinned, prereleases=True), str(requirement)

    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(quickstart) == 2
    assert quickstart[0].startswith(f"{INSTALL} && python -m monai.bundle run inference ")
    assert quickstart[1] == f"{INSTALL} && {TEST_COMMAND}"
    assert ".ci/refresh-lock" in readme

    ci = (REPO / ".ci" / "run").read_text()
    assert 'python -m venv "$tmp/venv"' in ci and 'source "$tmp/venv/bin/activate"' in ci
    assert re.search(r"^pip install .*-c constraints\.txt -e \"\.\[dev\]\"$", ci, re.M)
    assert ci.rstrip().endswith(f"{TEST_COMMAND} --durations=20")


@pytest.mark.slow
def test_verify_metadata_offline() -> None:
    """The vendored schema sits at `filepath`, so verify_metadata checks its hash and never downloads."""
    # fmt: off
    result = monai_bundle(
        "verify_metadata", "--meta_file", str(METADATA), "--filepath", str(SCHEMA),
        "--hash_val", SCHEMA_MD5, "--hash_type", "md5",
    )
    # fmt: on
    assert "skipped downloading" in result.stdout + result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.slow
def test_verify_net_in_out() -> None:
    """The inference network (num_objects 1) maps 1×4×3×32×32 to 1×2×3×32×32 float32 (spatial shape with n = 2)."""
    # fmt: off
    monai_bundle(
        "verify_net_in_out", "network_def", "--meta_file", str(METADATA), "--config_file", str(INFERENCE),
        "--device", "cpu", "--n", "2",
    )
    # fmt: on


@pytest.mark.slow
def test_torchscript_export_matches_pytorch(exported: dict[str, Path]) -> None:
    """Scripted (not traced) export: any clip length; outputs equal the eager model's on a real clip."""
    frames, mask = sample_clip(3, 128)
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255  # 3×T×H×W
    label = torch.zeros(1, *video.shape[1:])
    label[0, 0] = torch.from_numpy(mask)
    x = torch.cat([video, label])[None]
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(exported["ts"]), _extra_files=extra).eval()
    assert json.loads(extra["metadata.json"])["version"] == json.loads(METADATA.read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    with torch.no_grad():
        expected = eager_network(exported["ckpt"])(x)
        out = ts(x)
        out_short = ts(x[:, :, :2])
    assert out.shape == (1, 2, 3, 128, 128)
    assert (out - expected).abs().max() <= 1e-4
    assert (out_short - expected[:, :, :2]).abs().max() <= 1e-4


@pytest.mark.slow
def test_torchscript_runs_through_inferer(exported: dict[str, Path]) -> None:
    """inference_torchscript.json layered on inference.json gives the eager model's labels on 5 sample frames."""
    frames, mask = sample_clip(5, 64)
    labels = {}
    for configs, overrides in [
        ([INFERENCE], {"ckpt_path": str(exported["ckpt"])}),
        ([INFERENCE, CONFIGS / "inference_torchscript.json"], {"ts_path": str(exported["ts"])}),
    ]:
        parser = ConfigParser()
        parser.read_config([str(c) for c in configs])
        parser.update({"device": "$torch.device('cpu')", "progress": False, "mem_every": 2, "top_k": 20, **overrides})
        parser.get_parsed_content("load_weights")
        propagator = parser.get_parsed_content("propagator")
        labels[len(configs)] = dict(propagator.propagate(frames, {0: mask}))
    assert isinstance(propagator.network, torch.jit.ScriptModule)
    assert sorted(labels[2]) == list(range(5))
    for t in range(5):
        np.testing.assert_array_equal(labels[2][t], labels[1][t])
    assert any(labels[1][t].any() for t in range(1, 5))


@pytest.mark.slow
def test_onnx_frame_step_matches_pytorch(checkpoint: Path, tmp_path: Path) -> None:
    """The exported per-frame step, run by onnxruntime with memories of 1 and 2 frames (dynamic N), on real frames."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = eager_network(checkpoint)
    path = export_onnx(net, tmp_path / "step.onnx", 64, 64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    frames, mask = sample_clip(4, 64)
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    step = FrameStep(net).eval()
    with torch.no_grad():
        key, f16, _, _ = net.encode_key(images[:2])
        masks = torch.from_numpy(mask).float()[None, None].expand(2, 1, 64, 64)
        value = net.encode_value(images[:2], f16, masks)
        for n in (1, 2):
            mem_key = key[:n].permute(1, 0, 2, 3).flatten(1)[None]
            mem_value = value[:n].permute(1, 2, 0, 3, 4).flatten(2)[None]
            for t in (2, 3):
                expected = step(images[t : t + 1], mem_key, mem_value)
                feeds = {"frame": images[t : t + 1].numpy(), "mem_key": mem_key.numpy(), "mem_value": mem_value.numpy()}
                (out,) = session.run(None, feeds)
                assert out.shape == (1, 2, 64, 64)
                assert np.abs(out - expected.numpy()).max() <= 1e-4


@pytest.mark.style
def test_style() -> None:
    """isort, black and flake8 clean (settings in pyproject.toml and .flake8); configs are 4-space JSON."""
    failures = []
    for tool in (["isort", "--check-only"], ["black", "--check"], ["flake8"]):
        result = subprocess.run(
            [sys.executable, "-m", *tool, "bundle/scripts", "tests"], cwd=REPO, capture_output=True, text=True
        )
        if result.returncode != 0:
            failures.append(f"{tool[0]}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    for path in sorted(CONFIGS.glob("*.json")):
        text = path.read_text()
        if text != json.dumps(json.loads(text), indent=4) + "\n":
            failures.append(f"not 4-space JSON: {path.relative_to(REPO)}")
    assert not failures, "\n".join(failures)


def test_schema_is_vendored_verbatim() -> None:
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
