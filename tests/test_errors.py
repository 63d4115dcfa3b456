"""A failed or interrupted job ends in one line: real `python -m monai.bundle run …` subprocesses of every job.

"One line" means: with MONAI's trust warning filtered as the README shows (`PYTHONWARNINGS`, which `run_all` sets),
stderr holds exactly the `error:` line; stdout holds only MONAI's INFO log of the run's inputs, which every run
prints. `--debug true` or `TCMN_DEBUG=1` brings the traceback back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti_series
from PIL import Image
from test_cli import TRUSTED_CONFIGS, bundle_command, run_all

from scripts.errors import DEBUG_ENV, INTERRUPTED_DEFAULT, input_error_behind
from scripts.flags import job_and_debug
from scripts.staging import STAGING_PREFIX


def one_error_line(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Non-zero exit; stderr is exactly one `error:` line holding the phrases; no traceback anywhere."""
    assert result.returncode not in (0, None), result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-4000:]
    assert all(p in lines[0] for p in phrases), lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_the_job_and_the_debug_switch_are_read_off_the_command_line() -> None:
    assert job_and_debug(["inference", "--video", "x"]) == ("inference", False)
    assert job_and_debug(["evaluating", "--debug", "true"]) == ("evaluating", True)
    assert job_and_debug(["training", "--debug"]) == ("training", True)
    assert job_and_debug(["training", "--debug", "maybe"]) == ("training", False)  # check_flags refuses it


def test_the_input_error_is_found_behind_monais_wrappers() -> None:
    from scripts.errors import InputError

    try:
        try:
            raise InputError("clip.mp4: truncated")
        except InputError as inner:
            raise RuntimeError("Failed to instantiate component") from inner
    except RuntimeError as outer:
        assert str(input_error_behind(outer)) == "clip.mp4: truncated"
    assert input_error_behind(RuntimeError("a bug")) is None


@pytest.mark.slow
def test_every_job_ends_a_bad_input_with_one_line(tmp_path: Path, checkpoint: Path) -> None:
    """A missing input of each job (inference, batch inference, evaluation, training, app): one `error:` line on
    stderr naming it, non-zero exit, no traceback; with --debug true or TCMN_DEBUG=1 the traceback comes back."""
    missing = tmp_path / "no_such_clip.mp4"
    nowhere = tmp_path / "nowhere"
    model = dict(ckpt_path=checkpoint, device="cpu")
    inference = bundle_command("inference", "inference.json", video=missing, output_dir=tmp_path / "o1", **model)
    commands = {
        "inference": inference,
        "batch": bundle_command(
            "batch_inference", "batch_inference.json", datalist=nowhere, output_dir=tmp_path / "o2", **model
        ),
        "evaluating": bundle_command(
            "evaluating", "evaluate.json", dataset_dir=nowhere, output_dir=tmp_path / "o3", **model
        ),
        "training": bundle_command(
            "training", "train.json", dataset_dir=nowhere, output_dir=tmp_path / "o4", device="cpu"
        ),
        "app": bundle_command("app", "app.json", data_dir=nowhere, device="cpu"),
        "debug flag": inference + ["--debug", "true"],
    }
    results = run_all(commands)
    for name in ("batch", "evaluating", "training", "app"):
        one_error_line(results[name], str(nowhere))
    one_error_line(results["inference"], str(missing), "no such file")
    debug = results["debug flag"]
    assert debug.returncode != 0 and "Traceback" in debug.stderr, debug.stderr[-2000:]
    assert debug.stderr.strip().splitlines()[-1] == f"error: {missing}: no such file or directory"
    env = {**os.environ, DEBUG_ENV: "1", "PYTHONWARNINGS": TRUSTED_CONFIGS, "OMP_NUM_THREADS": "1"}
    variable = subprocess.run(inference, env=env, capture_output=True, text=True, timeout=900)
    assert variable.returncode != 0 and "Traceback" in variable.stderr, variable.stderr[-2000:]
    assert variable.stderr.strip().splitlines()[-1] == f"error: {missing}: no such file or directory"
    assert not [p for p in ("o1", "o2", "o3", "o4") if (tmp_path / p).exists()]  # training's echo comes after the check


@pytest.mark.slow
def test_ctrl_c_ends_an_inference_with_one_line_and_nothing_written(tmp_path: Path, checkpoint: Path) -> None:
    """SIGINT while a real inference propagates (its staging folder exists): the process ends by SIGINT (exit
    status 130 in a shell), stderr says "interrupted, nothing written" and nothing else, and no output remains."""
    rng = np.random.default_rng(0)
    video = tmp_path / "long.nii.gz"
    write_nifti_series(video, (rng.random((400, 192, 256)) * 255).astype(np.uint8), fps=20.0)
    mask = np.zeros((192, 256), np.uint8)
    mask[10:40, 10:40] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    command = bundle_command(
        "inference",
        "inference.json",
        video=video,
        mask=tmp_path / "mask.png",
        output_dir=out,
        device="cpu",
        progress="false",  # the bar is progress, not an error message: stderr holds the one line only without it
    )
    env = {**os.environ, "PYTHONWARNINGS": TRUSTED_CONFIGS, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(  # SIGINT as a terminal delivers it, even where this process runs with it ignored
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 600
        while not (out.is_dir() and any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        time.sleep(0.5)  # well into the propagation
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (proc.returncode, stderr[-2000:])
    assert stderr.strip().splitlines() == [INTERRUPTED_DEFAULT], stderr[-4000:]
    assert "Traceback" not in stdout and not out.exists(), sorted(p.name for p in out.iterdir())
