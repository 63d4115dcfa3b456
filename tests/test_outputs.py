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
from conftest import AFFINE, assert_input_error, run_pipeline
from PIL import Image

import scripts.outputs
import scripts.staging
from scripts.annotations import read_label_series
from scripts.baselines import CopyFirstFrame
from scripts.errors import InputError
from scripts.outputs import LabelSeriesWriter, allocated_memmap, write_png_labels
from scripts.overlay import write_overlay
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


# ------------------------------------------------------- label series, PNG labels and overlays
# a rotated, offset, non-unit-spacing geometry, exact in float32 (a CT/MR volume's kind)
OBLIQUE = np.array([[0.0, -0.7, 0.0, 10.5], [0.8, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    "name, make, zooms, units, codes, out_shape",
    [
        (
            "volume",
            lambda f: f[..., 0].transpose(2, 1, 0).astype(np.int16) - 500,
            (0.8, 0.7, 2.5),
            ("mm", "unknown"),
            (1, 1),
            (80, 64, 8),
        ),
        ("WxHxT", lambda f: f[..., 0].transpose(2, 1, 0), (0.5, 0.25, 0.04), ("mm", "sec"), (0, 2), (80, 64, 8)),
        (
            "WxHx1xT",
            lambda f: f[..., 0].transpose(2, 1, 0)[:, :, None],
            (0.5, 0.25, 1.0, 0.04),
            ("mm", "sec"),
            (0, 2),
            (80, 64, 1, 8),
        ),
        ("WxHxTx3", lambda f: f.transpose(2, 1, 0, 3), (0.5, 0.25, 0.04, 1.0), ("mm", "sec"), (1, 0), (80, 64, 8)),
    ],
)
def test_label_series_has_the_nifti_input_layout(tmp_path, smooth_clip, name, make, zooms, units, codes, out_shape):
    """Same shape (less an RGB axis), affine, qform/sform codes, pixdims and units: the labels overlay in a viewer."""
    affine = (OBLIQUE if name == "volume" else AFFINE).copy()
    affine[:3, 2] *= zooms[2] / np.linalg.norm(affine[:3, 2])  # the qform's 3rd zoom is pixdim[3]
    image = nib.Nifti1Image(make(smooth_clip), affine)
    image.header.set_zooms(zooms)
    image.header.set_qform(affine, codes[0])
    image.header.set_sform(affine, codes[1])
    image.header.set_xyzt_units(*units)
    nib.save(image, tmp_path / f"{name}.nii.gz")
    source = open_video(tmp_path / f"{name}.nii.gz")
    labels = (np.stack(list(source))[..., 0] // 64).astype(np.uint8)
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", source.info) as writer:
        for t in range(len(source)):
            writer.write(t, labels[t])
    given, written = nib.load(tmp_path / f"{name}.nii.gz"), nib.load(tmp_path / "labels.nii.gz")
    assert (int(given.header["qform_code"]), int(given.header["sform_code"])) == codes
    assert written.shape == out_shape and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, given.affine)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == codes
    np.testing.assert_array_equal(written.header.get_zooms(), given.header.get_zooms()[: len(out_shape)])
    assert written.header.get_xyzt_units() == units
    np.testing.assert_array_equal(read_label_series(tmp_path / "labels.nii.gz"), labels)
    again = open_video(tmp_path / "labels.nii.gz").info
    assert (again.spacing, again.fps) == (source.info.spacing, source.info.fps)
    assert source.info.fps == (25.0 if name == "WxHx1xT" else None)  # only a 4th axis is time for NIfTI


def test_every_pixdim_of_a_nifti_input_is_kept(tmp_path, smooth_clip):
    """A W×H×T file (dim[0] = 3) whose user stored the frame interval in pixdim[4], beyond its dimensions, and
    values in pixdim[5..7]: the label series carries every pixdim as given."""
    image = nib.Nifti1Image(smooth_clip[..., 0].transpose(2, 1, 0), AFFINE)
    image.header["pixdim"][1:8] = (0.5, 0.25, 2.0, 0.04, 3.0, 5.0, 7.0)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, tmp_path / "clip.nii.gz")
    source = open_video(tmp_path / "clip.nii.gz")
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", source.info) as writer:
        for t in range(len(source)):
            writer.write(t, np.zeros((source.info.height, source.info.width), np.uint8))
    given, written = nib.load(tmp_path / "clip.nii.gz").header, nib.load(tmp_path / "labels.nii.gz").header
    assert int(written["dim"][0]) == 3 and float(written["pixdim"][4]) == pytest.approx(0.04)
    np.testing.assert_array_equal(written["pixdim"][1:8], given["pixdim"][1:8])


def test_label_series_writer_keeps_the_input_geometry(clip_files, echo_clip, tmp_path):
    info = open_video(clip_files["nifti"]).info
    with LabelSeriesWriter(tmp_path / "labels.nii.gz", info) as writer:
        for t in reversed(range(info.num_frames)):
            writer.write(t, echo_clip[1][t])
    np.testing.assert_array_equal(read_label_series(tmp_path / "labels.nii.gz"), echo_clip[1])
    written = open_video(tmp_path / "labels.nii.gz").info
    np.testing.assert_array_equal(written.affine, info.affine)
    assert (written.spacing, written.fps, written.num_frames) == (info.spacing, info.fps, info.num_frames)
    assert nib.load(tmp_path / "labels.nii.gz").get_data_dtype() == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]  # the memmap buffer is gone


def test_label_series_writer_refuses_missing_frames(clip_files, tmp_path):
    writer = LabelSeriesWriter(tmp_path / "labels.nii", open_video(clip_files["frames"]).info)
    writer.write(0, np.ones((64, 80), np.uint8))
    with pytest.raises(ValueError, match="7 frames were never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_png_labels_are_exact(echo_clip, tmp_path):
    for t in (0, 7):
        path = write_png_labels(tmp_path, t, echo_clip[1][t])
        with Image.open(path) as image:
            assert path.name == f"0000{t}.png" and image.mode == "L"
    np.testing.assert_array_equal(read_label_series(tmp_path), echo_clip[1][[0, 7]])


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_overlay_has_one_frame_per_input_frame(clip_files, echo_clip, tmp_path, suffix):
    source = open_video(clip_files["frames"])
    write_overlay(tmp_path / f"overlay{suffix}", source, echo_clip[1])
    if suffix == ".mp4":
        assert len(open_video(tmp_path / "overlay.mp4")) == len(source)
    else:
        with Image.open(tmp_path / "overlay.gif") as gif:
            assert gif.n_frames == len(source)
            gif.seek(5)
            frame = np.asarray(gif.convert("RGB"))
        cavity = echo_clip[1][5] == 1
        assert frame[cavity][:, 0].mean() > source[5][cavity][:, 0].mean() + 20  # tinted red (label 1)


def test_output_directory_with_results(clip_files, tmp_path, clip_labels_png):
    """Only the job's own output name is refused or replaced; the user's other files stay as they are."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    run_pipeline(clip_files["frames"], [clip_labels_png], None, out)  # a folder holding other files is fine
    assert sorted(os.listdir(out)) == ["labels.nii.gz", "notes.txt"]
    (out / "labels.nii.gz").write_bytes(b"previous run")
    with pytest.raises(InputError) as error:
        run_pipeline(clip_files["frames"], [clip_labels_png], None, out)
    assert_input_error(error, out, "already holds results", "labels.nii.gz")
    with pytest.raises(InputError):  # overwrite, but the run fails: the old results stay
        run_pipeline(clip_files["frames"], [tmp_path / "absent.png"], None, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["labels.nii.gz", "notes.txt"]
    assert (out / "labels.nii.gz").read_bytes() == b"previous run"
    run_pipeline(clip_files["frames"], [clip_labels_png], None, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["labels.nii.gz", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert read_label_series(out / "labels.nii.gz").shape == (8, 64, 80)
