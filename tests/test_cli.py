"""The README's command contracts, through real `python -m monai.bundle run …` subprocesses.

Each subprocess spends 15-30 s importing MONAI and torch, so checks are grouped and the subprocesses of a group run
concurrently. The model is a seeded, untrained lite TCMN (these tests check outputs and errors, not accuracy) and
runs at `--size 64`. The unmarked tests (the sample job, a missing video, an output directory already holding
results, `--overwrite true`) take about a minute and a half; the rest are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, REPO, SAMPLE, SAMPLE_SEQUENCE
from PIL import Image

from scripts.annotations import read_label_series
from scripts.network import TCMN
from scripts.readers import open_video

CONFIGS = REPO / "bundle" / "configs"
TIMEOUT_S = 900
SCORES = ("J&F", "J", "F", "Dice", "HD95")


def bundle_command(job: str, config: str, **overrides: object) -> list[str]:
    """`python -m monai.bundle run JOB` with the bundle's metadata, one config and `--key value` overrides."""
    command = [sys.executable, "-m", "monai.bundle", "run", job, "--meta_file", str(CONFIGS / "metadata.json")]
    command += ["--config_file", str(CONFIGS / config)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once and wait for all: start-up (imports) dominates, so they overlap well."""
    env = {**os.environ}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # tiny workloads; several processes share the cores
    procs = {
        name: subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stderr[-4000:]}"


def refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Non-zero exit, and stderr carries every phrase (the file's name and the problem)."""
    assert result.returncode != 0, f"{' '.join(result.args)} succeeded\n{result.stdout[-2000:]}"
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in stderr:\n{result.stderr[-4000:]}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(p in last for p in phrases[:1]), f"last line of stderr: {last!r}"


def no_leftovers(directory: Path) -> None:
    """No staging (`.NAME.*.partial`), previous-results (`.old`) or label-buffer (`.labels`) entries remain."""
    hidden = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert not hidden, f"left behind in {directory}: {hidden}"


def series(path: Path) -> np.ndarray:
    """T×H×W labels of a written series."""
    return read_label_series(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a freshly initialised, seeded lite TCMN (no trained weights are needed to check the contracts)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(TCMN("lite", pretrained=False).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def masks(tmp_path_factory: pytest.TempPathFactory, echo_clip) -> dict[str, Path]:
    """PNG label maps for the 8-frame 64×80 synthetic clip (`clip_files`): good ones, a wrong-sized and an empty one."""
    root = tmp_path_factory.mktemp("masks")
    _, labels = echo_clip
    files = {
        "frame0": labels[0],
        "frame4": labels[4],
        "frame5": np.where(labels[5] > 0, 2, 0).astype(np.uint8),  # a correction unlike the model's output
        "small": labels[0][:32, :32],
        "empty": np.zeros_like(labels[0]),
    }
    for name, values in files.items():
        Image.fromarray(values).save(root / f"{name}.png")
    return {name: root / f"{name}.png" for name in files}


def infer(checkpoint: Path, **overrides: object) -> list[str]:
    return bundle_command(
        "inference", "inference.json", ckpt_path=checkpoint, device="cpu", size=64, progress="false", **overrides
    )


def test_inference_on_the_sample(tmp_path: Path, checkpoint: Path) -> None:
    """The Quickstart job annotated in the middle (frame 12 of 24): every output under its contract name."""
    video = SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE
    mask = SAMPLE / "Annotations" / SAMPLE_SEQUENCE / "00012.png"
    out = tmp_path / "out"
    command = infer(
        checkpoint, video=video, mask=mask, mask_frame=12, output_dir=out, save_png="true", save_overlay="true"
    )
    result = run_all({"sample": command})["sample"]
    succeeded(result)
    name = SAMPLE_SEQUENCE
    assert sorted(p.name for p in out.iterdir()) == [name, f"{name}_overlay.mp4", f"{name}_seg.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    seg = nib.load(str(out / f"{name}_seg.nii.gz"))
    assert seg.shape == (512, 512, 1, 24) and seg.get_data_dtype() == np.uint8
    labels = series(out / f"{name}_seg.nii.gz")
    annotation = np.asarray(Image.open(mask))
    np.testing.assert_array_equal(labels[12], annotation)
    assert set(np.unique(labels)) <= set(np.unique(annotation)) | {0}
    assert [p.name for p in sorted((out / name).iterdir())] == [f"{t:05d}.png" for t in range(24)]
    np.testing.assert_array_equal(read_label_series(out / name), labels)
    with open_video(out / f"{name}_overlay.mp4") as overlay:
        assert (len(overlay), overlay.info.height, overlay.info.width) == (24, 512, 512)
    assert f"{name}_seg.nii.gz" in result.stdout and "[12]" in result.stdout


@pytest.mark.slow
def test_missing_video_and_existing_results_are_refused(
    tmp_path: Path, checkpoint: Path, clip_files: dict[str, Path], masks: dict[str, Path]
) -> None:
    """Both refusals exit non-zero naming the path and leave everything as it was; with `--overwrite true` the same
    job replaces earlier results (in a twin directory, so all three runs overlap) and keeps the NIfTI's geometry."""
    missing, fresh = tmp_path / "no_such_clip.mp4", tmp_path / "fresh"
    occupied, replaced = tmp_path / "occupied", tmp_path / "replaced"
    for directory in (occupied, replaced):
        directory.mkdir()
        (directory / "old_seg.nii.gz").write_bytes(b"earlier results")
    common = dict(mask=masks["frame0"])
    results = run_all(
        {
            "missing": infer(checkpoint, video=missing, output_dir=fresh, **common),
            "occupied": infer(checkpoint, video=clip_files["nifti"], output_dir=occupied, **common),
            "overwrite": infer(checkpoint, video=clip_files["nifti"], output_dir=replaced, overwrite="true", **common),
        }
    )
    refused(results["missing"], str(missing), "no such file")
    refused(results["occupied"], str(occupied), "already holds results")
    assert [p.name for p in occupied.iterdir()] == ["old_seg.nii.gz"]
    assert (occupied / "old_seg.nii.gz").read_bytes() == b"earlier results"

    succeeded(results["overwrite"])
    assert [p.name for p in replaced.iterdir()] == ["clip_seg.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "replaced"]  # no staging, no "fresh"
    seg, source = nib.load(str(replaced / "clip_seg.nii.gz")), nib.load(str(clip_files["nifti"]))
    np.testing.assert_array_equal(seg.affine, AFFINE)
    assert seg.header.get_zooms() == source.header.get_zooms()  # spacing and frame time
    np.testing.assert_array_equal(series(replaced / "clip_seg.nii.gz")[0], np.asarray(Image.open(masks["frame0"])))


@pytest.mark.slow
def test_bad_inputs_exit_non_zero_and_write_nothing(
    tmp_path: Path, checkpoint: Path, clip_files: dict[str, Path], masks: dict[str, Path]
) -> None:
    """Each bad input: non-zero exit, the file and the problem named on stderr, no output directory, no staging.
    The truncated MP4 may fail while opening or only during propagation (after staging began): both must clean up."""
    data = clip_files["mp4"].read_bytes()
    garbage, truncated = tmp_path / "garbage.mp4", tmp_path / "truncated.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated.write_bytes(data[: int(len(data) * 0.95)])
    nifti, good = clip_files["nifti"], masks["frame0"]
    cases = {
        "garbage": (dict(video=garbage, mask=good), (str(garbage), "unreadable video")),
        "truncated": (dict(video=truncated, mask=good), (str(truncated), "truncated")),
        "wrong size": (dict(video=nifti, mask=masks["small"]), (str(masks["small"]), "mask is 32×32 (H×W)", "64×80")),
        "no foreground": (dict(video=nifti, mask=masks["empty"]), (str(masks["empty"]), "no foreground")),
        "out of range": (dict(video=nifti, mask=good, mask_frame=8), (str(good), "annotated frame 8 is out of range")),
    }
    outputs = {name: tmp_path / f"out_{i}" for i, name in enumerate(cases)}
    results = run_all({name: infer(checkpoint, output_dir=outputs[name], **args) for name, (args, _) in cases.items()})
    for name, (_, phrases) in cases.items():
        refused(results[name], *phrases)
        assert not outputs[name].exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.mp4", "truncated.mp4"]


@pytest.mark.slow
def test_mp4_input_and_corrections(
    tmp_path: Path, checkpoint: Path, clip_files: dict[str, Path], masks: dict[str, Path]
) -> None:
    """An MP4 annotated in the middle (forward, then backward with seeking), and two annotated frames given as
    `--mask a.png,b.png --mask_frame 0,5`: every annotated frame keeps its labels exactly."""
    mp4, corrected = tmp_path / "mp4", tmp_path / "corrected"
    two_masks = f"{masks['frame0']},{masks['frame5']}"
    results = run_all(
        {
            "mp4": infer(
                checkpoint, video=clip_files["mp4"], mask=masks["frame4"], mask_frame=4, output_dir=mp4, save_png=True
            ),
            "corrected": infer(
                checkpoint, video=clip_files["nifti"], mask=two_masks, mask_frame="0,5", output_dir=corrected
            ),
        }
    )
    succeeded(results["mp4"])
    assert sorted(p.name for p in mp4.iterdir()) == ["clip", "clip_seg.nii.gz"]
    labels = series(mp4 / "clip_seg.nii.gz")
    assert labels.shape == (8, 64, 80)
    np.testing.assert_array_equal(labels[4], np.asarray(Image.open(masks["frame4"])))
    np.testing.assert_array_equal(read_label_series(mp4 / "clip"), labels)
    assert nib.load(str(mp4 / "clip_seg.nii.gz")).header.get_zooms()[3] == pytest.approx(1 / 20)  # the MP4's fps

    succeeded(results["corrected"])
    labels = series(corrected / "clip_seg.nii.gz")
    np.testing.assert_array_equal(labels[0], np.asarray(Image.open(masks["frame0"])))
    np.testing.assert_array_equal(labels[5], np.asarray(Image.open(masks["frame5"])))
    assert "[0, 5]" in results["corrected"].stdout
    no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def sample_cut(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 frames of the embedded sample as a DAVIS root named `vocalfolds`."""
    root = tmp_path_factory.mktemp("data") / "vocalfolds"
    for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".png")):
        (root / folder / SAMPLE_SEQUENCE).mkdir(parents=True)
        for t in range(4):
            name = f"{t:05d}{suffix}"
            shutil.copy(SAMPLE / folder / SAMPLE_SEQUENCE / name, root / folder / SAMPLE_SEQUENCE / name)
    return root


@pytest.mark.slow
def test_evaluating_every_method(tmp_path: Path, checkpoint: Path, sample_cut: Path) -> None:
    """`run evaluating --method copy|flow|model`: metrics.json with the scores on top, and the predictions."""
    methods = {"copy": "CopyFirstFrame", "flow": "FarnebackFlow", "model": "ModelPropagator"}
    commands = {
        method: bundle_command(
            "evaluating",
            "evaluate.json",
            dataset_dir=sample_cut,
            output_dir=tmp_path / method,
            method=method,
            ckpt_path=checkpoint,
            device="cpu",
            size=64,
        )
        for method in methods
    }
    results = run_all(commands)
    for method, class_name in methods.items():
        succeeded(results[method])
        out = tmp_path / method
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["method"] == class_name and metrics["dataset"] == "vocalfolds"
        for score in SCORES:
            assert score in metrics
        for score in ("J&F", "J", "F", "Dice"):
            assert 0 <= metrics[score] <= 1, (method, score, metrics[score])
        assert metrics["HD95"] is None or metrics["HD95"] >= 0
        preds = sorted((out / "pred" / SAMPLE_SEQUENCE).iterdir())
        assert [p.name for p in preds] == [f"{t:05d}.png" for t in range(4)]
        assert (out / "per_sequence.csv").is_file() and (out / "jf.png").is_file()
    copy = read_label_series(tmp_path / "copy" / "pred" / SAMPLE_SEQUENCE)
    np.testing.assert_array_equal(copy, np.repeat(copy[:1], 4, axis=0))  # the copy baseline, through the CLI
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(methods)
