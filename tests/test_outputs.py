"""Never lose a user's data (scripts.staging, scripts.outputs, scripts.predict): only the job's own outputs are
refused or replaced, every argument and the free space are checked before propagation, a write that fails (full disk,
file-size limit) ends with a one-line error and no leftovers, and what is written follows the user's umask."""

from __future__ import annotations

import errno
import gzip
import os
import resource
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import scripts.outputs
import scripts.staging
from scripts.baselines import CopyFirstFrame
from scripts.errors import InputError
from scripts.outputs import LabelSeriesWriter, allocated_memmap
from scripts.predict import Prediction
from scripts.readers import open_video
from scripts.staging import staged_output
from scripts.synthetic import write_echo_dataset


class NeverCalled:
    """A propagator that fails the test if the job gets as far as propagating."""

    def propagate(self, source, annotations):
        pytest.fail("the job propagated before refusing its arguments")


def no_leftovers(directory: Path) -> None:
    hidden = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert not hidden, f"left behind in {directory}: {hidden}"


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def mask(tmp_path: Path, echo_clip) -> Path:
    path = tmp_path / "inputs" / "mask.png"
    path.parent.mkdir()
    Image.fromarray(echo_clip[1][0]).save(path)
    return path


def stage(out: Path, overwrite: bool = False, fail: bool = False) -> None:
    """A job writing the file `labels.nii.gz` and the folder `labels/`."""
    with staged_output(out, ["labels.nii.gz", "labels"], overwrite) as staging:
        (staging / "labels.nii.gz").write_bytes(b"new series")
        (staging / "labels").mkdir()
        (staging / "labels" / "00000.png").write_bytes(b"new png")
        if fail:
            raise RuntimeError("the job failed")


# ---------------------------------------------------------------- overwrite replaces only what the job writes


def test_only_the_jobs_own_outputs_are_refused_or_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"the user's clip")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("the user's notes")
    stage(out)  # a folder holding other files is fine
    assert contents(out) == {
        "clip.mp4": b"the user's clip",
        "labels.nii.gz": b"new series",
        "labels/00000.png": b"new png",
        "notes/todo.txt": b"the user's notes",
    }
    (out / "labels" / "stale.png").write_bytes(b"from an earlier run")
    (out / "labels.nii.gz").write_bytes(b"earlier series")
    before = contents(out)
    with pytest.raises(InputError, match=r"already holds results \(labels.nii.gz, labels\)"):
        stage(out)
    assert contents(out) == before
    with pytest.raises(RuntimeError, match="the job failed"):  # overwrite, but the job fails: all stays
        stage(out, overwrite=True, fail=True)
    assert contents(out) == before
    stage(out, overwrite=True)  # exactly the job's names are replaced (a replaced folder as a whole)
    assert contents(out) == {
        "clip.mp4": b"the user's clip",
        "labels.nii.gz": b"new series",
        "labels/00000.png": b"new png",
        "notes/todo.txt": b"the user's notes",
    }
    no_leftovers(out)


def test_a_failed_hand_over_puts_the_earlier_results_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second output cannot be moved into place: the first new one is taken out again, both old ones return."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "labels.nii.gz").write_bytes(b"earlier series")
    (out / "labels").mkdir()
    (out / "labels" / "00000.png").write_bytes(b"earlier png")
    (out / "notes.txt").write_text("the user's notes")
    before = contents(out)
    rename = os.rename

    def failing_rename(src, dst) -> None:
        if Path(dst) == out / "labels" and Path(src).parent.name != ".replaced":  # the new one, not the restore
            raise OSError(28, "No space left on device", str(src))
        rename(src, dst)

    monkeypatch.setattr(scripts.staging.os, "rename", failing_rename)
    with pytest.raises(InputError, match=f"{out / 'labels'}: cannot write the results: No space left on device"):
        stage(out, overwrite=True)
    assert contents(out) == before
    no_leftovers(out)


def test_whole_folder_jobs_declare_their_names(tmp_path: Path) -> None:
    """The synthetic dataset writer stages its three entries; a root holding other files is fine, one holding a
    dataset is refused."""
    root = tmp_path / "echo"
    root.mkdir()
    (root / "README.txt").write_text("the user's file")
    write_echo_dataset(root, num_sequences=1, num_frames=2, height=16, width=16)
    assert sorted(p.name for p in root.iterdir()) == ["Annotations", "JPEGImages", "README.txt", "meta.json"]
    with pytest.raises(InputError, match="already holds results"):
        write_echo_dataset(root, num_sequences=1, num_frames=2, height=16, width=16)
    no_leftovers(root)


def test_output_dir_holding_the_inputs(clip_files: dict[str, Path], mask: Path) -> None:
    """`output_dir` = the folder of the clip and the mask, without overwrite: the inputs stay untouched."""
    folder = mask.parent
    shutil.copy(clip_files["nifti"], folder / "clip.nii.gz")
    before = contents(folder)
    Prediction(str(folder / "clip.nii.gz"), str(mask), CopyFirstFrame(), str(folder), save_png=True).run()
    assert sorted(p.name for p in folder.iterdir()) == ["clip", "clip.nii.gz", "clip_seg.nii.gz", "mask.png"]
    assert {k: v for k, v in contents(folder).items() if k in before} == before
    no_leftovers(folder)


def test_an_output_that_would_replace_an_input_is_refused(clip_files: dict[str, Path], tmp_path: Path) -> None:
    """A frame folder `d/clip/` with `--save_png` into `d`: the PNG folder `d/clip/` is the input; even with
    overwrite the job is refused before any work."""
    folder = tmp_path / "d"
    shutil.copytree(clip_files["frames"], folder / "clip")
    mask = folder / "clip" / "00000.png"
    before = contents(folder)
    with pytest.raises(InputError, match=f"{folder / 'clip'}: would replace the input"):
        Prediction(str(folder / "clip"), str(mask), NeverCalled(), str(folder), save_png=True, overwrite=True)
    assert contents(folder) == before


# ---------------------------------------------------------------- every argument checked before any work


@pytest.mark.parametrize(
    "override, phrases",
    [
        (dict(overlay_format="avi", save_overlay=True), ("--overlay_format", "'avi'", "mp4 or gif")),
        (dict(overlay_format="avi"), ("--overlay_format", "'avi'")),
        (dict(save_png="maybe"), ("--save_png", "'maybe'")),
        (dict(overwrite="yes please"), ("--overwrite", "'yes please'")),
        (dict(mask_frame="first"), ("--mask_frame", "'first'")),
        (dict(mask_frame=-1), ("--mask_frame", "count from 0")),
        (dict(mask_frame="0,4"), ("1 annotation files but 2 annotated frame indices",)),
        (dict(mask="absent.png"), ("absent.png: no such annotation file",)),
        (dict(video="absent.mp4"), ("absent.mp4: no such file or directory",)),
        (dict(output_dir=""), ("--output_dir",)),
    ],
)
def test_arguments_are_refused_when_the_job_is_built(
    clip_files: dict[str, Path], mask: Path, tmp_path: Path, override: dict, phrases: tuple[str, ...]
) -> None:
    args = dict(video=str(clip_files["nifti"]), mask=str(mask), output_dir=str(tmp_path / "out"))
    args.update(override)
    with pytest.raises(InputError) as error:
        Prediction(propagator=NeverCalled(), **args)
    for phrase in phrases:
        assert phrase in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists()


def test_not_enough_space_is_refused_before_propagation(
    clip_files: dict[str, Path], mask: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scripts.staging.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "new" / "out"
    job = Prediction(str(clip_files["nifti"]), str(mask), NeverCalled(), str(out), save_png=True, save_overlay=True)
    with pytest.raises(InputError) as error:
        job.run()
    message = str(error.value)
    assert message.startswith(f"{out}: not enough free space: 4.9 KiB free, the outputs need about "), message
    assert "8 frames of 64×80 labels at about " in message
    assert not (tmp_path / "new").exists()  # the folders created for the outputs are gone again


# ---------------------------------------------------------------- writes that fail


def test_the_label_buffer_holds_compressed_frames(clip_files: dict[str, Path], echo_clip, tmp_path: Path) -> None:
    """Frames wait for the NIfTI compressed (a raw T×H×W buffer made the disk need several times the outputs), are
    read back exactly in any order, and the NIfTI streamed from them is byte for byte what nibabel writes."""
    info = open_video(clip_files["nifti"]).info
    labels = echo_clip[1]
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", info) as writer:
        for t in reversed(range(info.num_frames)):
            writer.write(t, labels[t])
        assert os.path.getsize(writer.buffer) < labels.size / 10
        np.testing.assert_array_equal(writer.labels[5], labels[5])
        np.testing.assert_array_equal(np.asarray(writer.labels), labels)
    image = scripts.outputs._series_image(labels, info.affine, info.fps, info.layout)
    image.header.set_intent("label")
    nib.save(image, tmp_path / "nibabel.nii.gz")
    with gzip.open(tmp_path / "labels.nii.gz") as ours, gzip.open(tmp_path / "nibabel.nii.gz") as theirs:
        assert ours.read() == theirs.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "nibabel.nii.gz"]  # no buffer left


def test_the_free_space_estimate_is_close_to_what_the_sample_writes(sample_dir: Path, tmp_path: Path) -> None:
    """The shipped weights on the sample clip, every output: the estimate the free-space check uses is within 3×
    of the space the outputs take on disk."""
    import torch

    from scripts.inferer import ModelPropagator, PropagationInferer
    from scripts.network import TCMN, load_network_weights
    from scripts.predict import estimate_output_bytes, label_frame_bytes

    network = TCMN("lite", pretrained=False)
    load_network_weights(network, str(sample_dir.parents[1] / "models" / "model.pt"), torch.device("cpu"))
    video = sample_dir / "JPEGImages" / "patient2_seq7"
    mask = sample_dir / "Annotations" / "patient2_seq7" / "00000.png"
    propagator = ModelPropagator(network, PropagationInferer())
    job = Prediction(str(video), str(mask), propagator, str(tmp_path / "out"), save_png=True, save_overlay=True)
    job.run()
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "out").rglob("*"))
    annotation = {0: np.asarray(Image.open(mask))}
    estimate = estimate_output_bytes(open_video(video).info, True, "mp4", label_frame_bytes(annotation))
    assert used / 3 <= estimate <= 3 * used, (estimate, used)


def test_a_file_size_limit_ends_with_the_path_and_the_cause(
    clip_files: dict[str, Path], mask: Path, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE below the compressed 8×64×80 label buffer: EFBIG (CPython ignores SIGXFSZ), named, nothing
    left."""
    out = tmp_path / "out"
    out.mkdir()
    job = Prediction(str(clip_files["nifti"]), str(mask), CopyFirstFrame(), str(out))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, limits[1]))
    try:
        with pytest.raises(InputError) as error:
            job.run()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert str(error.value) == f"{out / 'clip_seg.nii.gz'}: cannot write the results: File too large"
    assert list(out.iterdir()) == []


def test_a_full_disk_while_writing_ends_with_the_path_and_the_cause(
    clip_files: dict[str, Path], mask: Path, tmpfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free-space estimate is bypassed, so the write itself meets ENOSPC on a one-page (4 KiB) tmpfs, which
    the compressed label buffer and the NIfTI do not fit together: one line naming the output and the cause,
    nothing left on the mount."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scripts.staging.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    out = tmpfs("full", "4k")
    job = Prediction(str(clip_files["nifti"]), str(mask), CopyFirstFrame(), str(out))
    with pytest.raises(InputError) as error:
        job.run()
    assert str(error.value) == f"{out / 'clip_seg.nii.gz'}: cannot write the results: No space left on device"
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- permissions


def test_created_folders_and_files_follow_the_umask(clip_files: dict[str, Path], mask: Path, tmp_path: Path) -> None:
    """Colleagues on a shared server can read the results: 0755 folders and 0644 files under umask 022."""
    out = tmp_path / "new" / "out"
    previous = os.umask(0o022)
    try:
        Prediction(
            str(clip_files["nifti"]), str(mask), CopyFirstFrame(), str(out), save_png=True, save_overlay=True
        ).run()
        write_echo_dataset(tmp_path / "echo", num_sequences=1, num_frames=2, height=16, width=16)
    finally:
        os.umask(previous)
    folders = [tmp_path / "new", out, out / "clip", tmp_path / "echo", tmp_path / "echo" / "JPEGImages"]
    files = [
        out / "clip_seg.nii.gz",
        out / "clip" / "00000.png",
        out / "clip_overlay.mp4",
        tmp_path / "echo" / "meta.json",
    ]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {str(p): "0o755" for p in folders}
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): "0o644" for p in files}


def test_allocated_memmap_reserves_its_space_and_refuses_a_full_disk(tmp_path: Path, tmpfs) -> None:
    """The app's result buffer: disk blocks exist before any write (no SIGBUS later); no room raises, no file left."""
    buffer = allocated_memmap(tmp_path / "results.labels", (4, 64, 64))
    assert os.stat(tmp_path / "results.labels").st_blocks * 512 >= 4 * 64 * 64
    buffer[2] = 7
    buffer.flush()
    assert np.fromfile(tmp_path / "results.labels", np.uint8).reshape(4, 64, 64)[2].min() == 7
    small = tmpfs("small", "64k")
    with pytest.raises(OSError) as err:
        allocated_memmap(small / "results.labels", (10, 256, 256))
    assert err.value.errno in (errno.ENOSPC, errno.EFBIG) and not (small / "results.labels").exists()
