"""Test-time adaptation (`scripts.adapt`): a copy is tuned, never the loaded network or the weights file; 0 steps is
off; the same seed gives the same weights; the time limit holds; its flags are checked in every job that propagates."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE, SAMPLE_SEQUENCE
from monai.bundle import ConfigParser
from PIL import Image
from test_cli import bundle_command, config_files, run_all, series, succeeded

from scripts.adapt import TARGETS, TestTimeAdaptation
from scripts.flags import check_flags
from scripts.inferer import ModelPropagator, PropagationInferer
from scripts.network import TCMN, load_network_weights
from scripts.runtime import RuntimeNetwork, runtime_network

WEIGHTS = REPO / "bundle" / "models" / "model.pt"
CONFIGS = REPO / "bundle" / "configs"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """The sample's first 4 frames, 128×128 (adaptation crops at the static stage's size whatever the frame size)."""
    folder = SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE
    paths = sorted(folder.iterdir())[:4]
    return [np.asarray(Image.open(p).convert("RGB").resize((128, 128), Image.BILINEAR)) for p in paths]


@pytest.fixture(scope="module")
def annotation() -> np.ndarray:
    mask = Image.open(SAMPLE / "Annotations" / SAMPLE_SEQUENCE / "00000.png")
    return np.asarray(mask.resize((128, 128), Image.NEAREST))


def shipped() -> RuntimeNetwork:
    """The shipped lite weights as the jobs hold them: loaded from disk, wrapped for the torch runtime."""
    return runtime_network(load_network_weights(TCMN("lite", pretrained=False), WEIGHTS).eval())


def tensors(frame: np.ndarray, annotation: np.ndarray) -> tuple[dict, dict]:
    image = torch.from_numpy(frame.copy()).permute(2, 0, 1)[None].float() / 255
    return {0: image}, {0: torch.from_numpy(annotation.astype(np.int64))}


def state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


def test_a_copy_is_tuned_in_its_target_only_and_the_weights_file_is_untouched(frames, annotation) -> None:
    before = sha256(WEIGHTS)
    network = shipped()
    loaded = state(network.network)
    adaptation = TestTimeAdaptation(steps=2, lr=1e-3, target="bottleneck")
    adapted = adaptation(network, *tensors(frames[0], annotation))
    assert isinstance(adapted, RuntimeNetwork) and adapted.network is not network.network
    assert adaptation.last_steps == 2
    for name, value in network.network.state_dict().items():
        torch.testing.assert_close(value, loaded[name], rtol=0, atol=0)  # the loaded network: unchanged
    changed = {k for k, v in adapted.network.state_dict().items() if not torch.equal(v, loaded[k])}
    assert changed and all(k.startswith(TARGETS["bottleneck"]) for k in changed), sorted(changed)
    assert not adapted.network.training and not any(p.requires_grad for p in adapted.network.parameters())
    assert sha256(WEIGHTS) == before


def test_zero_steps_gives_the_labels_of_no_adaptation(frames, annotation) -> None:
    network = shipped()

    def labels(adapt: TestTimeAdaptation | None) -> list[np.ndarray]:
        propagator = ModelPropagator(network, PropagationInferer(size=64, amp=False, adapt=adapt))
        return [labels for _, labels in sorted(propagator.propagate(frames, {0: annotation}), key=lambda x: x[0])]

    off, zero = labels(None), labels(TestTimeAdaptation(steps=0))
    assert len(off) == len(frames)
    for a, b in zip(off, zero):
        assert a.tobytes() == b.tobytes()


def test_the_same_seed_gives_the_same_weights(frames, annotation) -> None:
    network = shipped()
    inputs = tensors(frames[0], annotation)
    runs = [TestTimeAdaptation(steps=1, seed=seed)(network, *inputs).network.state_dict() for seed in (0, 0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_the_time_limit_stops_the_steps(frames, annotation) -> None:
    adaptation = TestTimeAdaptation(steps=10**6, seconds=3)
    started = time.monotonic()
    adaptation(shipped(), *tensors(frames[0], annotation))
    elapsed = time.monotonic() - started
    assert 1 <= adaptation.last_steps < 10**6
    # the limit is checked after each step, so one step (a few seconds on a busy 2-core machine) can overrun it
    assert elapsed < 3.0 + 30, elapsed


def test_an_object_too_small_for_clips_leaves_the_network_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    """A one-pixel object in a 512² frame does not survive the resize to the static stage's 320 (nearest-exact samples
    rows and columns 0, 2, 4, …, 1 among the skipped): no clip can be made, so the job goes on unadapted, saying so."""
    frame = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(512, 512, dtype=torch.int64)
    labels[1, 1] = 1
    network = shipped()
    adaptation = TestTimeAdaptation(steps=2)
    with caplog.at_level("WARNING", logger="scripts.adapt"):
        assert adaptation(network, {0: frame}, {0: labels}) is network
    assert adaptation.last_steps == 0 and "propagating without adaptation" in caplog.text


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json", "batch_inference.json", "app.json"])
@pytest.mark.parametrize(
    "overrides, line",
    [
        ({"adapt_steps": -1}, "error: --adapt_steps -1: a non-negative integer"),
        ({"adapt_steps": "many"}, "error: --adapt_steps many: a non-negative integer"),
        ({"adapt_steps": 2.5}, "error: --adapt_steps 2.5: a non-negative integer"),
        ({"adapt_lr": 0}, "error: --adapt_lr 0: needs a number > 0"),
        ({"adapt_lr": "fast"}, "error: --adapt_lr fast: a number"),
        ({"adapt_steps": 4, "quantized": "int8.json"}, "error: --adapt_steps 4: adaptation changes the weights"),
    ],
)
def test_bad_flag_values_end_with_one_error_line(config: str, overrides: dict, line: str) -> None:
    parser = ConfigParser()
    parser.read_config(config_files(config))
    parser.update({**overrides, "runtime": "onnxruntime"} if "quantized" in overrides else overrides)
    flags = parser.get_parsed_content("flags")
    if "quantized" in overrides:  # only the adaptation's check: the calibration file and engine are not the point here
        flags = {name: spec for name, spec in flags.items() if name not in ("quantized", "runtime")}
    with pytest.raises(SystemExit) as exit_:
        check_flags(flags)
    (message,) = str(exit_.value.code).splitlines()
    assert message.startswith(line), message


def test_good_flag_values_pass() -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"adapt_steps": 3, "adapt_lr": 5e-5})
    check_flags(parser.get_parsed_content("flags"))


@pytest.mark.slow
def test_inference_with_adaptation_on_the_sample(tmp_path: Path) -> None:
    """The Quickstart job with `--adapt_steps 2` and the shipped weights: labels for every frame, the annotated one
    kept, the adaptation said in one log line, and the weights file unchanged."""
    before = sha256(WEIGHTS)
    out = tmp_path / "out"
    command = bundle_command(
        "inference", "inference.json", device="cpu", size=128, progress="false", output_dir=out, adapt_steps=2
    )
    result = run_all({"adapt": command})["adapt"]
    succeeded(result)
    labels = series(out / f"{SAMPLE_SEQUENCE}_seg.nii.gz")
    annotation = np.asarray(Image.open(SAMPLE / "Annotations" / SAMPLE_SEQUENCE / "00000.png"))
    assert labels.shape == (24, 512, 512)
    np.testing.assert_array_equal(labels[0], annotation)
    assert "adapted the bottleneck to 1 annotated frame(s): 2 steps in" in result.stdout + result.stderr
    assert sha256(WEIGHTS) == before
