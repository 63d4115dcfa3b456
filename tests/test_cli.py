"""The README's command contracts, through real `python -m monai.bundle run …` subprocesses.

Each subprocess spends 15-30 s importing MONAI and torch, so checks are grouped and the subprocesses of a group run
concurrently. The model is a seeded, untrained lite TCMN (these tests check outputs and errors, not accuracy) and
runs at `--size 64`. The unmarked tests (the sample job, a missing video, an output directory already holding
results, `--overwrite true`) take about a minute and a half; the rest are marked slow.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, REPO, SAMPLE, SAMPLE_SEQUENCE
from monai.bundle import ConfigParser
from PIL import Image

from scripts.annotations import read_label_series
from scripts.readers import open_video

CONFIGS = REPO / "bundle" / "configs"
TIMEOUT_S = 900
SCORES = ("J&F", "J", "F", "Dice", "HD95", "Lost")
# MONAI warns on every run that a config's expressions are eval()ed, before it reads any file of the bundle, so no
# config can turn it off; the README gives users this filter, which drops exactly that warning: safe here, the
# configs run are the bundle's own (and the tests' own overrides of them).
TRUSTED_CONFIGS = "ignore:parsing config_file:UserWarning:monai.bundle.scripts"
# the jobs whose config is a layer over inference.json (their commands name both, inference.json first)
LAYERS = {"evaluate.json": "evaluate", "batch_inference.json": "batch_inference", "app.json": "app"}


def config_files(config: str) -> list[str]:
    """The config files a job's command names: a layer comes after inference.json, as in the README."""
    return [str(CONFIGS / name) for name in (["inference.json", config] if config in LAYERS else [config])]


def declared_flags(config: str) -> dict[str, dict]:
    """A job's flag declarations as written (`value` still `@name`), in `--help`'s order: its own, then the model's
    (`model_flags` of inference.json)."""
    parser = ConfigParser(ConfigParser.load_config_files(config_files(config)))
    own = parser[f"{LAYERS.get(config, config.removesuffix('.json'))}_flags"]
    return {**own, **parser["model_flags"]}


def bundle_command(job: str, config: str, **overrides: object) -> list[str]:
    """`python -m monai.bundle run JOB` with the bundle's metadata, the job's config (a layer: inference.json and it)
    and `--key value` overrides."""
    command = [sys.executable, "-m", "monai.bundle", "run", job, "--meta_file", str(CONFIGS / "metadata.json")]
    files = config_files(config)
    command += ["--config_file", files[0] if len(files) == 1 else repr(files)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def run_all(
    commands: dict[str, list[str]], preexec: dict[str, Callable[[], None]] | None = None
) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once and wait for all: start-up (imports) dominates, so they overlap well.
    ``preexec`` gives some commands a function run in the child before it starts (e.g. a resource limit)."""
    env = {**os.environ}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # tiny workloads; several processes share the cores
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), TRUSTED_CONFIGS]))
    procs = {
        name: subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=(preexec or {}).get(name),
        )
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
    """No hidden entry remains: no staging folder (`.tcmn-staging.*`, which also holds replaced results until the end)
    and no label buffer (`.*.labels`)."""
    hidden = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert not hidden, f"left behind in {directory}: {hidden}"


def series(path: Path) -> np.ndarray:
    """T×H×W labels of a written series."""
    return read_label_series(path)


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
    closing = result.stdout.strip().splitlines()[-1]  # one line naming every output
    assert closing.startswith("wrote ") and "[12]" in closing, closing
    for output in (f"{name}_seg.nii.gz", f"{name}/", f"{name}_overlay.mp4"):
        assert str(out / output) in closing, closing


def folder_contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_missing_video_and_existing_results_are_refused(
    tmp_path: Path, checkpoint: Path, clip_files: dict[str, Path], masks: dict[str, Path]
) -> None:
    """Refusals exit non-zero naming the path and leave everything as it was: a missing video, and a folder holding
    the job's own output. With `--overwrite true` exactly the job's outputs are replaced (the user's notes and the PNG
    folder of an earlier `--save_png` run stay) and the NIfTI keeps its geometry. `--output_dir` = the folder of the
    clip and the mask works without overwrite and leaves the inputs untouched. All four runs overlap."""
    missing, fresh = tmp_path / "no_such_clip.mp4", tmp_path / "fresh"
    occupied, replaced, inputs = tmp_path / "occupied", tmp_path / "replaced", tmp_path / "inputs"
    for directory in (occupied, replaced, inputs):
        directory.mkdir()
    for directory in (occupied, replaced):
        (directory / "clip_seg.nii.gz").write_bytes(b"earlier results")
        (directory / "notes.txt").write_text("the user's notes")
        (directory / "clip").mkdir()
        (directory / "clip" / "00000.png").write_bytes(b"earlier png")
    shutil.copy(clip_files["nifti"], inputs / "clip.nii.gz")
    shutil.copy(masks["frame0"], inputs / "mask.png")
    before = {directory: folder_contents(directory) for directory in (occupied, replaced, inputs)}
    common = dict(mask=masks["frame0"])
    results = run_all(
        {
            "missing": infer(checkpoint, video=missing, output_dir=fresh, **common),
            "occupied": infer(checkpoint, video=clip_files["nifti"], output_dir=occupied, **common),
            "overwrite": infer(checkpoint, video=clip_files["nifti"], output_dir=replaced, overwrite="true", **common),
            "inputs": infer(
                checkpoint,
                video=inputs / "clip.nii.gz",
                mask=inputs / "mask.png",
                output_dir=inputs,
                save_png="true",
                save_overlay="true",
            ),
        }
    )
    refused(results["missing"], str(missing), "no such file")
    refused(results["occupied"], str(occupied), "already holds results", "clip_seg.nii.gz")
    assert folder_contents(occupied) == before[occupied]

    succeeded(results["inputs"])
    assert sorted(p.name for p in inputs.iterdir()) == [
        "clip",
        "clip.nii.gz",
        "clip_overlay.mp4",
        "clip_seg.nii.gz",
        "mask.png",
    ]
    assert {k: v for k, v in folder_contents(inputs).items() if k in before[inputs]} == before[inputs]
    closing = results["inputs"].stdout.strip().splitlines()[-1]
    assert all(str(inputs / name) in closing for name in ("clip_seg.nii.gz", "clip/", "clip_overlay.mp4")), closing

    succeeded(results["overwrite"])
    assert sorted(p.name for p in replaced.iterdir()) == ["clip", "clip_seg.nii.gz", "notes.txt"]
    assert {k: v for k, v in folder_contents(replaced).items() if k != "clip_seg.nii.gz"} == {
        k: v for k, v in before[replaced].items() if k != "clip_seg.nii.gz"
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "occupied", "replaced"]  # no "fresh"
    for directory in (occupied, replaced, inputs):
        no_leftovers(directory)
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
        "avi overlay": (dict(video=nifti, mask=good, save_overlay="true", overlay_format="avi"), ("--overlay_format",)),
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


def limit_file_size() -> None:
    """RLIMIT_FSIZE of 500 bytes in the child: below the 8×64×80 clip's compressed label buffer and NIfTI."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.slow
def test_full_disk_read_only_folder_file_size_limit_and_mount_point(
    tmp_path: Path, checkpoint: Path, clip_files: dict[str, Path], masks: dict[str, Path], tmpfs
) -> None:
    """A full disk (a 200 kB tmpfs and the 24-frame 512×512 sample: refused by the free-space estimate), a read-only
    output folder (a tmpfs remounted ro, as root ignores permission bits) and a file-size limit (RLIMIT_FSIZE) each
    end with `error: <path>: <cause>` as the last line, a non-zero exit and nothing left. A mount point with room is
    an ordinary output folder, `--overwrite true` included (renaming onto it used to fail with EBUSY)."""
    full, read_only, mount_point = tmpfs("full", "200k"), tmpfs("ro", "1m", read_only=True), tmpfs("mnt", "20m")
    limited = tmp_path / "limited"
    limited.mkdir()
    (mount_point / "clip_seg.nii.gz").write_bytes(b"earlier results")
    (mount_point / "notes.txt").write_text("the user's notes")
    sample = dict(
        video=SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE, mask=SAMPLE / "Annotations" / SAMPLE_SEQUENCE / "00000.png"
    )
    clip = dict(video=clip_files["nifti"], mask=masks["frame0"])
    results = run_all(
        {
            "full": infer(checkpoint, output_dir=full, save_png="true", **sample),
            "read-only": infer(checkpoint, output_dir=read_only, **clip),
            "file size": infer(checkpoint, output_dir=limited, **clip),
            "mount point": infer(checkpoint, output_dir=mount_point, overwrite="true", save_png="true", **clip),
        },
        preexec={"file size": limit_file_size},
    )
    refused(results["full"], f"{full}: not enough free space", "the outputs need about", "24 frames of 512×512 labels")
    refused(results["read-only"], f"{read_only}: cannot write the results: Read-only file system")
    refused(results["file size"], f"{limited / 'clip_seg.nii.gz'}: cannot write the results: File too large")
    for directory in (full, read_only, limited):
        assert list(directory.iterdir()) == [], directory

    succeeded(results["mount point"])
    assert sorted(p.name for p in mount_point.iterdir()) == ["clip", "clip_seg.nii.gz", "notes.txt"]
    assert (mount_point / "notes.txt").read_text() == "the user's notes"
    np.testing.assert_array_equal(series(mount_point / "clip_seg.nii.gz")[0], np.asarray(Image.open(masks["frame0"])))
    no_leftovers(mount_point)


@pytest.mark.slow
def test_volume_geometry_and_checkpoint_kinds(
    tmp_path: Path, checkpoint: Path, echo_clip, masks: dict[str, Path]
) -> None:
    """A 3-D volume (W×H×D, oblique, qform and sform set) comes out with its exact shape, affine and pixdims, from a
    checkpoint in train.json's format; a file that is no torch file and weights of the other variant are refused
    naming the checkpoint. The three runs overlap."""
    oblique = np.array([[0.0, -0.7, 0.0, 10.5], [0.8, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]])
    volume = nib.Nifti1Image(echo_clip[0][..., 0].transpose(2, 1, 0).astype(np.int16) * 4 - 1000, oblique)
    volume.header.set_qform(oblique, 1)
    volume.header.set_sform(oblique, 1)
    volume.header.set_xyzt_units("mm", "sec")  # as CT converters write 3-D volumes
    nib.save(volume, tmp_path / "ct.nii.gz")
    trained = tmp_path / "checkpoint_final.pt"  # what train.json's CheckpointSaver writes
    network = torch.load(checkpoint, weights_only=True)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).state_dict()
    trainer = {"epoch_length": 1, "max_epochs": 1, "iteration": 1}
    torch.save(dict(network=network, optimizer=optimizer, lr_scheduler={}, trainer=trainer, best_tracker={}), trained)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    common = dict(video=tmp_path / "ct.nii.gz", mask=masks["frame4"], mask_frame=4)
    results = run_all(
        {
            "volume": infer(trained, output_dir=tmp_path / "out", **common),
            "garbage": infer(garbage, output_dir=tmp_path / "garbage_out", **common),
            "variant": infer(checkpoint, variant="full", output_dir=tmp_path / "full_out", **common),
        }
    )
    succeeded(results["volume"])
    given, seg = nib.load(tmp_path / "ct.nii.gz"), nib.load(tmp_path / "out" / "ct_seg.nii.gz")
    assert seg.shape == given.shape == (80, 64, 8)
    np.testing.assert_array_equal(seg.affine, given.affine)
    assert (seg.header["qform_code"], seg.header["sform_code"]) == (1, 1)
    assert seg.header.get_zooms() == given.header.get_zooms() and seg.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_array_equal(
        series(tmp_path / "out" / "ct_seg.nii.gz")[4], np.asarray(Image.open(masks["frame4"]))
    )
    refused(results["garbage"], str(garbage), "not a PyTorch file")
    refused(results["variant"], str(checkpoint), "holds weights of another network", "--variant")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pt", "ct.nii.gz", "garbage.pt", "out"]


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
        closing = results[method].stdout.strip().splitlines()[-1]  # one line naming every output
        for name in ("metrics.json", "per_sequence.csv", "jf.png", "pred/"):
            assert str(out / name) in closing, closing
    copy = read_label_series(tmp_path / "copy" / "pred" / SAMPLE_SEQUENCE)
    np.testing.assert_array_equal(copy, np.repeat(copy[:1], 4, axis=0))  # the copy baseline, through the CLI
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(methods)


@pytest.mark.slow
def test_command_line_mistakes_are_refused_before_any_work(tmp_path: Path, checkpoint: Path) -> None:
    """A mistyped flag is refused naming the closest valid one and listing them all, `--help` lists every flag and runs
    nothing, a bad value ends with the one line `error: --flag VALUE: …`; none writes anything, and no run prints
    MONAI's eval warning (see `TRUSTED_CONFIGS`) or its warning about a missing logging.conf."""
    out = tmp_path / "out"  # no job may create it
    inference = dict(ckpt_path=checkpoint, output_dir=out)
    commands = {
        "typo": bundle_command("inference", "inference.json", vidoe=SAMPLE, **inference),
        "plural": bundle_command("inference", "inference.json", save_overlays="true", **inference),
        "training typo": bundle_command("training", "train.json", max_epoch=3, output_dir=out),
        "help": bundle_command("inference", "inference.json", **inference) + ["--help"],
    }
    bad_values = {
        ("inference", "mask_frame", "middle"),
        ("inference", "mask_frame", "2.5"),
        ("inference", "save_png", "maybe"),
        ("inference", "size", "0"),
        ("inference", "overlay_format", "avi"),
        ("evaluating", "method", "flo"),
    }
    if not torch.cuda.is_available():
        bad_values.add(("inference", "device", "cuda"))
    config = {"inference": "inference.json", "evaluating": "evaluate.json"}
    for job, flag, value in bad_values:
        commands[f"--{flag} {value}"] = bundle_command(job, config[job], **{**inference, flag: value})
    results = run_all(commands)

    flags = declared_flags("inference.json")
    refused(results["typo"], "--vidoe", "did you mean --video?", *(f"--{name}," for name in list(flags)[:-1]))
    refused(results["plural"], "--save_overlays", "did you mean --save_overlay?")
    refused(results["training typo"], "--max_epoch", "did you mean --max_epochs?")
    succeeded(results["help"])
    lines = results["help"].stdout.splitlines()
    for name, spec in flags.items():
        (line,) = [line for line in lines if line.lstrip().startswith(f"--{name} ")]
        assert spec["help"] in line and ("(default: " in line or "(set to: " in line), line
    assert "wrote" not in results["help"].stdout
    for _, flag, value in bad_values:
        result = results[f"--{flag} {value}"]
        refused(result, f"--{flag} {value}: ")
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: --{flag} {value}: "), result.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.iterdir())
    for name, result in results.items():
        assert "only proceed if" not in result.stderr.lower(), name
        assert "logging.conf does not exist" not in result.stdout + result.stderr, name
