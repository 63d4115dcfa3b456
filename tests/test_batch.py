"""Many videos: batch inference (lists, resume, failure isolation, sharding over torchrun ranks), evaluation sharded
over ranks, and the DICOM SEG written for DICOM inputs.

The unmarked tests run in-process with the copy-first-frame baseline as the propagator (the batch logic does not
depend on the model); the slow ones run real `python -m monai.bundle run` and `torchrun` subprocesses on tiny
generated clips (6 frames of 48×64) with a seeded untrained lite network, CPU ranks talking over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_cli import TRUSTED_CONFIGS, bundle_command, declared_flags, no_leftovers, refused, run_all, series, succeeded

from scripts.baselines import CopyFirstFrame
from scripts.batch import REPORT, BatchPrediction, read_datalist
from scripts.distributed import share
from scripts.errors import InputError
from scripts.predict import Prediction
from scripts.staging import LOCK_NAME, STAGING_PREFIX
from scripts.synthetic import SyntheticEchoSource

FRAMES, HEIGHT, WIDTH = 6, 48, 64
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_clip(root: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A synthetic echo clip as a PNG frame folder `root/name/` and its frame-0 label map `root/name.png`."""
    source = SyntheticEchoSource(FRAMES, HEIGHT, WIDTH, seed=seed)
    (root / name).mkdir(parents=True)
    for t, frame in enumerate(source):
        Image.fromarray(frame).save(root / name / f"{t:05d}.png")
    Image.fromarray(source.labels(0)).save(root / f"{name}.png")
    return root / name, root / f"{name}.png"


def write_datalist(root: Path, count: int, corrupt: str | None = None) -> Path:
    """`count` clips and a Decathlon-style datalist with relative paths; `corrupt` adds a garbage MP4 entry."""
    entries = []
    for i in range(count):
        video, mask = write_clip(root, f"clip{i}", seed=i)
        entries.append({"image": video.name, "label": mask.name, "mask_frame": 0})
    if corrupt is not None:
        (root / f"{corrupt}.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
        entries.insert(2, {"image": f"{corrupt}.mp4", "label": "clip0.png"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"testing": entries}))
    return path


def test_datalists_and_davis_folders_are_read(tmp_path: Path) -> None:
    """Relative paths resolve against the datalist's folder; a DAVIS folder gives each sequence's first annotation
    and its frame; bad lists are refused naming the file and the problem."""
    path = write_datalist(tmp_path / "list", 2)
    videos = read_datalist(path)
    assert [(v.name, v.video, v.mask, v.mask_frame) for v in videos] == [
        (f"clip{i}", str(tmp_path / "list" / f"clip{i}"), (str(tmp_path / "list" / f"clip{i}.png"),), (0,))
        for i in range(2)
    ]
    davis = tmp_path / "davis"
    for seq in ("b", "a"):
        (davis / "JPEGImages" / seq).mkdir(parents=True)
        (davis / "Annotations" / seq).mkdir(parents=True)
        for t in range(3):
            Image.new("RGB", (8, 8)).save(davis / "JPEGImages" / seq / f"{t:05d}.jpg")
    Image.new("L", (8, 8), 1).save(davis / "Annotations" / "a" / "00002.png")
    Image.new("L", (8, 8), 1).save(davis / "Annotations" / "b" / "00000.png")
    videos = read_datalist(davis)
    assert [(v.name, v.mask_frame) for v in videos] == [("a", (2,)), ("b", (0,))]

    bad = {
        "nolist.json": ({"training": []}, '"testing"'),
        "nolabel.json": ({"testing": [{"image": "clip0"}]}, 'has no "label"'),
        "twice.json": (
            {"testing": [{"image": "x/clip", "label": "m.png"}, {"image": "y/clip", "label": "m.png"}]},
            "clip",
        ),
        "slash.json": ({"testing": [{"image": "clip", "label": "m.png", "name": "a/b"}]}, "cannot name"),
        "frame.json": ({"testing": [{"image": "clip", "label": "m.png", "mask_frame": "first"}]}, '"mask_frame"'),
    }
    for name, (content, phrase) in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(InputError, match=str(tmp_path / name)) as error:
            read_datalist(tmp_path / name)
        assert phrase in str(error.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="not a JSON datalist"):
        read_datalist(tmp_path / "broken.json")


def test_shares_cover_the_list_once() -> None:
    """MONAI's interleaved partition for uneven lists; fewer videos than ranks leaves the last ranks idle."""
    for count, ranks in ((7, 2), (5, 3), (1, 2), (4, 4)):
        shares = [share(range(count), rank, ranks) for rank in range(ranks)]
        assert sorted(i for s in shares for i in s) == list(range(count))
    assert share(range(5), 0, 2) == [0, 2, 4] and share(range(5), 1, 2) == [1, 3]


def outputs_of(directory: Path) -> dict[str, float]:
    """Every file below `directory` and its modification time, hidden staging folders and the folder's lock file left
    out (a kill may leave them beside finished outputs, and the rerun clears them)."""
    files = (p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_NAME)
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in files if STAGING_PREFIX not in str(p)}


def test_batch_isolates_failures_and_resumes_from_disk(tmp_path: Path) -> None:
    """In-process batch with the copy baseline: a corrupt video is recorded and the rest are done; a rerun skips the
    complete videos without touching them, redoes one holding only part of its outputs, and clears a killed run's
    staging folder."""
    path = write_datalist(tmp_path / "list", 3, corrupt="broken")
    out = tmp_path / "out"
    options = dict(datalist=str(path), output_dir=str(out), propagator=CopyFirstFrame(), save_png=True)
    report = BatchPrediction(**options).run()
    assert (report["videos"], report["done"], report["skipped"], report["failed"]) == (4, 3, 0, 1)
    assert [r["name"] for r in report["results"]] == ["clip0", "clip1", "broken", "clip2"]  # list order
    (failure,) = report["failures"]
    assert failure["name"] == "broken" and str(tmp_path / "list" / "broken.mp4") in failure["error"]
    assert report["frames"] == 3 * FRAMES and report["frames_per_second"] > 0
    assert json.loads((out / REPORT).read_text()) == report
    assert sorted(p.name for p in out.iterdir()) == ["batch_report.json", "clip0", "clip1", "clip2"]
    for i in range(3):
        assert sorted(p.name for p in (out / f"clip{i}").iterdir()) == [f"clip{i}", f"clip{i}_seg.nii.gz"]
        labels = series(out / f"clip{i}" / f"clip{i}_seg.nii.gz")
        np.testing.assert_array_equal(labels[0], np.asarray(Image.open(tmp_path / "list" / f"clip{i}.png")))

    before = outputs_of(out / "clip0")
    (out / "clip1" / "clip1_seg.nii.gz").unlink()  # only its PNG folder is left
    (out / "clip2" / f"{STAGING_PREFIX}killed").mkdir()  # what a SIGKILLed run leaves behind
    (out / "clip2" / LOCK_NAME).write_text("pid 4242 on elsewhere: the killed run")  # its lock, released by the OS
    (out / "clip2" / "notes.txt").write_text("the user's notes")
    rerun = BatchPrediction(**options)
    rerun.finish()  # before a run: nothing to report, nothing raised
    report = rerun.run()
    status = {r["name"]: r["status"] for r in report["results"]}
    assert status == {"clip0": "skipped", "clip1": "done", "broken": "failed", "clip2": "skipped"}
    assert outputs_of(out / "clip0") == before
    assert (out / "clip1" / "clip1_seg.nii.gz").is_file()
    assert sorted(p.name for p in (out / "clip2").iterdir()) == ["clip2", "clip2_seg.nii.gz", "notes.txt"]
    for i in range(3):
        no_leftovers(out / f"clip{i}")
    with pytest.raises(SystemExit, match=f"error: 1 of 4 videos failed \\(broken\\); {out / REPORT} holds each error"):
        rerun.finish()


def dicom_series(directory: Path, frames: np.ndarray, same_plane: bool = False) -> dict:
    """`frames` (T×H×W uint8) as a folder of single-frame MR images of one series with a frame of reference, pixel
    spacing and plane positions 1.5 mm apart (all equal with `same_plane`, as a cine); files named in reverse order,
    so the reader must sort them by position. Returns the UIDs."""
    directory.mkdir(parents=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), "instances": []}
    for t, frame in enumerate(frames):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Series", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
            "20260101",
            "120000",
            "",
            "",
            "1",
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, t + 1
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *frame.shape, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelSpacing, ds.SliceThickness = [0.3, 0.25], 1.5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [10.0, -5.0, 2.0 + (0 if same_plane else 1.5 * t)]
        ds.PixelData = np.ascontiguousarray(frame, np.uint8).tobytes()
        ds.save_as(directory / f"{len(frames) - t:03d}.dcm", enforce_file_format=True)
        uids["instances"].append(ds.SOPInstanceUID)
    return uids


def test_dicom_seg_matches_the_nifti_and_references_the_source(tmp_path: Path, echo_clip, clip_files) -> None:
    """A DICOM series in gives `<name>_seg.dcm` by default: one segment per label named from `labels` (else
    `label_<n>`), per-frame masks equal to the NIfTI result, references to the source's study, series, instances,
    frame of reference and pixel spacing. A same-plane cine gets no SEG by default (noted) and is refused when
    asked; asking for one on a non-DICOM input is refused."""
    frames, labels = echo_clip
    labels = labels.copy()
    labels[0][labels[0] == 2] = 3  # label values 1 and 3: segments 1 and 2
    Image.fromarray(labels[0]).save(tmp_path / "mask.png")
    uids = dicom_series(tmp_path / "series", frames[..., 0])
    out = tmp_path / "out"
    prediction = Prediction(
        str(tmp_path / "series"), str(tmp_path / "mask.png"), CopyFirstFrame(), str(out), labels="3=right ventricle"
    )
    assert prediction.output_names() == ["series_seg.nii.gz", "series_seg.dcm"]
    prediction.run()
    nifti = series(out / "series_seg.nii.gz")
    seg = pydicom.dcmread(out / "series_seg.dcm")
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(seg)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["label_1", "right ventricle"]
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (uids["study"], uids["frame"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    referenced = [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(uids["instances"])
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [0.3, 0.25]
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids["instances"], combine_segments=False)
    assert masks.shape == (len(frames), *frames.shape[1:3], 2)
    np.testing.assert_array_equal(masks[..., 0], nifti == 1)
    np.testing.assert_array_equal(masks[..., 1], nifti == 3)
    np.testing.assert_array_equal(nifti[0], labels[0])

    multiframe = Prediction(str(clip_files["dicom"]), str(tmp_path / "mask.png"), CopyFirstFrame(), str(out / "mf"))
    multiframe.run()  # ITK's multi-frame file: per-frame plane positions in functional groups
    seg = hd.seg.segread(out / "mf" / "clip_seg.dcm")
    source = pydicom.dcmread(clip_files["dicom"], stop_before_pixels=True)
    masks = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=source.SOPInstanceUID,
        source_frame_numbers=list(range(1, len(frames) + 1)),
        combine_segments=False,
    )
    np.testing.assert_array_equal(masks[..., 0], series(out / "mf" / "clip_seg.nii.gz") == 1)

    dicom_series(tmp_path / "cine", frames[..., 0], same_plane=True)
    cine = Prediction(str(tmp_path / "cine"), str(tmp_path / "mask.png"), CopyFirstFrame(), str(tmp_path / "c"))
    assert cine.output_names() == ["cine_seg.nii.gz"]
    with pytest.raises(InputError, match=f"{tmp_path / 'cine'}: cannot write a DICOM SEG: .*share a plane position"):
        Prediction(str(tmp_path / "cine"), str(tmp_path / "mask.png"), CopyFirstFrame(), "c", save_dicom_seg=True)
    with pytest.raises(InputError, match="--save_dicom_seg: .* is not DICOM"):
        Prediction(str(tmp_path / "mask.png"), str(tmp_path / "mask.png"), CopyFirstFrame(), "c", save_dicom_seg="true")
    with pytest.raises(InputError, match="--labels: "):
        Prediction(str(tmp_path / "series"), str(tmp_path / "mask.png"), CopyFirstFrame(), "c", labels="ventricle")


def torchrun(job: str, configs: str, nproc: int, **overrides: object) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m monai.bundle run JOB` with `configs` (a name or a list)."""
    command = bundle_command(job, configs, **overrides)
    if configs.startswith("["):  # MONAI reads a config list written as a Python list literal
        command[command.index("--config_file") + 1] = configs
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command[1:]]


def batch(checkpoint: Path, datalist: Path, output_dir: Path, **overrides: object) -> dict[str, object]:
    return {
        "datalist": datalist,
        "output_dir": output_dir,
        "ckpt_path": checkpoint,
        "device": "cpu",
        "size": 48,
        **overrides,
    }


@pytest.mark.slow
def test_two_cpu_ranks_share_the_list_and_isolate_a_corrupt_video(tmp_path: Path, checkpoint: Path) -> None:
    """`torchrun --nproc_per_node 2` over 6 videos, one corrupt: every good video gets exactly what single-video
    inference writes (compared with a `run inference` of one of them), the report merges both ranks, and the job
    exits non-zero naming the failed video and the report."""
    datalist = write_datalist(tmp_path / "list", 5, corrupt="broken")
    out, single = tmp_path / "out", tmp_path / "single"
    results = run_all(
        {
            "batch": torchrun(
                "batch_inference", "batch_inference.json", 2, **batch(checkpoint, datalist, out, save_png="true")
            ),
            "single": bundle_command(
                "inference",
                "inference.json",
                video=tmp_path / "list" / "clip3",
                mask=tmp_path / "list" / "clip3.png",
                output_dir=single,
                ckpt_path=checkpoint,
                device="cpu",
                size=48,
                save_png="true",
                progress="false",
            ),
        }
    )
    succeeded(results["single"])
    result = results["batch"]
    assert result.returncode != 0
    assert f"error: 1 of 6 videos failed (broken); {out / REPORT} holds each error" in result.stderr
    report = json.loads((out / REPORT).read_text())
    assert (report["world_size"], report["videos"], report["done"], report["failed"]) == (2, 6, 5, 1)
    assert [r["name"] for r in report["results"]] == [
        "clip0",
        "clip1",
        "broken",
        "clip2",
        "clip3",
        "clip4",
    ]
    assert [r["videos"] for r in report["ranks"]] == [3, 3] and sum(r["done"] for r in report["ranks"]) == 5
    assert str(tmp_path / "list" / "broken.mp4") in report["failures"][0]["error"]
    assert report["frames"] == 5 * FRAMES and report["frames_per_second"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["batch_report.json"] + [f"clip{i}" for i in range(5)]
    for i in range(5):
        folder = out / f"clip{i}"
        assert sorted(p.name for p in folder.iterdir()) == [f"clip{i}", f"clip{i}_seg.nii.gz"]
        labels = series(folder / f"clip{i}_seg.nii.gz")
        assert labels.shape == (FRAMES, HEIGHT, WIDTH)
        np.testing.assert_array_equal(series(folder / f"clip{i}"), labels)
        no_leftovers(folder)
    np.testing.assert_array_equal(series(out / "clip3" / "clip3_seg.nii.gz"), series(single / "clip3_seg.nii.gz"))
    assert nib.load(out / "clip3" / "clip3_seg.nii.gz").header == nib.load(single / "clip3_seg.nii.gz").header


@pytest.mark.slow
def test_killed_batch_resumes_without_redoing_finished_videos(tmp_path: Path, checkpoint: Path) -> None:
    """SIGKILL once some but not all videos are done; the rerun skips exactly those (their files untouched), does
    the rest, and leaves no staging folder behind."""
    datalist = write_datalist(tmp_path / "list", 8)
    out = tmp_path / "out"
    command = bundle_command("batch_inference", "batch_inference.json", **batch(checkpoint, datalist, out, size=128))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": TRUSTED_CONFIGS}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done: list[str] = []
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        done = [f"clip{i}" for i in range(8) if (out / f"clip{i}" / f"clip{i}_seg.nii.gz").exists()]
        if done:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = [f"clip{i}" for i in range(8) if (out / f"clip{i}" / f"clip{i}_seg.nii.gz").exists()]
    assert 0 < len(done) < 8, f"the kill came too late: {done}"
    before = {name: outputs_of(out / name) for name in done}
    result = run_all({"rerun": command})["rerun"]
    succeeded(result)
    report = json.loads((out / REPORT).read_text())
    status = {r["name"]: r["status"] for r in report["results"]}
    assert status == {f"clip{i}": "skipped" if f"clip{i}" in done else "done" for i in range(8)}
    assert report["skipped"] == len(done) and report["done"] == 8 - len(done) and report["failed"] == 0
    for name in done:
        assert outputs_of(out / name) == before[name]
    for i in range(8):
        assert (out / f"clip{i}" / f"clip{i}_seg.nii.gz").is_file()
        no_leftovers(out / f"clip{i}")
    no_leftovers(out)


@pytest.mark.slow
def test_bad_datalist_is_refused_before_any_work(tmp_path: Path, checkpoint: Path) -> None:
    """A datalist entry without a label ends the job with one `error:` line naming the file, writing nothing."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"testing": [{"image": "clip"}]}))
    out = tmp_path / "out"
    result = run_all({"bad": bundle_command("batch_inference", "batch_inference.json", **batch(checkpoint, bad, out))})
    refused(result["bad"], str(bad), 'has no "label"')
    assert not out.exists()


@pytest.mark.slow
def test_evaluation_over_two_ranks_equals_one_process(tmp_path: Path, checkpoint: Path) -> None:
    """`multi_gpu_evaluate.json` over `inference.json` and `evaluate.json` under torchrun with 2 CPU ranks: the same
    J&F (to 1e-6) and per-sequence scores as one process, and the same predicted label maps; a sequence annotating
    nothing is reported alike by both."""
    root = tmp_path / "echo"
    for i in range(4):
        source = SyntheticEchoSource(FRAMES, HEIGHT, WIDTH, seed=10 + i)
        for folder in ("JPEGImages", "Annotations"):
            (root / folder / f"echo{i}").mkdir(parents=True)
        for t, frame in enumerate(source):
            labels = source.labels(t) * (i < 3)  # echo3: no frame annotates anything
            Image.fromarray(frame).save(root / "JPEGImages" / f"echo{i}" / f"{t:05d}.png")
            Image.fromarray(labels.astype(np.uint8)).save(root / "Annotations" / f"echo{i}" / f"{t:05d}.png")
    common = dict(dataset_dir=root, ckpt_path=checkpoint, device="cpu", size=48)
    layered = str([f"bundle/configs/{name}" for name in ("inference.json", "evaluate.json", "multi_gpu_evaluate.json")])
    results = run_all(
        {
            "one": bundle_command("evaluating", "evaluate.json", output_dir=tmp_path / "one", **common),
            "two": torchrun("evaluating", layered, 2, output_dir=tmp_path / "two", **common),
        }
    )
    succeeded(results["one"])
    succeeded(results["two"])
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert two["J&F"] == pytest.approx(one["J&F"], abs=1e-6)
    assert two["num_sequences"] == one["num_sequences"] == 3
    assert list(one["failed"]) == ["echo/echo3"] and two["failed"] == one["failed"]
    for name, scores in one["sequences"].items():
        assert two["sequences"][name]["J&F"] == pytest.approx(scores["J&F"], abs=1e-6)
        np.testing.assert_array_equal(
            series(tmp_path / "two" / "pred" / name), series(tmp_path / "one" / "pred" / name)
        )
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "jf.png",
        "metrics.json",
        "per_sequence.csv",
        "pred",
    ]
    no_leftovers(tmp_path / "two")


@pytest.mark.slow
def test_dicom_seg_and_flags_through_the_command_line(tmp_path: Path, checkpoint: Path, echo_clip) -> None:
    """`run inference` on a DICOM series writes the SEG by default with `--labels` names; `batch_inference --help`
    lists its flags and a mistyped one is refused naming the closest."""
    frames, labels = echo_clip
    Image.fromarray(labels[0]).save(tmp_path / "mask.png")
    dicom_series(tmp_path / "series", frames[..., 0])
    datalist = write_datalist(tmp_path / "list", 1)
    common = dict(ckpt_path=checkpoint, device="cpu", size=48)
    results = run_all(
        {
            "dicom": bundle_command(
                "inference",
                "inference.json",
                video=tmp_path / "series",
                mask=tmp_path / "mask.png",
                output_dir=tmp_path / "out",
                labels="1=left ventricle,2=myocardium",
                progress="false",
                **common,
            ),
            "help": bundle_command("batch_inference", "batch_inference.json", datalist=datalist, **common) + ["--help"],
            "typo": bundle_command(
                "batch_inference", "batch_inference.json", datalist=datalist, output_dir=tmp_path / "o", save_seg=1
            ),
        }
    )
    succeeded(results["dicom"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["series_seg.dcm", "series_seg.nii.gz"]
    assert str(tmp_path / "out" / "series_seg.dcm") in results["dicom"].stdout.strip().splitlines()[-1]
    seg = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    present = [int(v) for v in np.unique(series(tmp_path / "out" / "series_seg.nii.gz")) if v]
    assert names == {k: {1: "left ventricle", 2: "myocardium"}[v] for k, v in enumerate(present, 1)}
    succeeded(results["help"])
    for name in declared_flags("batch_inference.json"):
        assert f"--{name} " in results["help"].stdout, name
    refused(results["typo"], "--save_seg", "did you mean --save_png?")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_batch_takes_progress_like_inference(tmp_path: Path, checkpoint: Path) -> None:
    """`--progress true` (refused before) shows each video's propagation bar; `--progress maybe` is refused."""
    datalist = write_datalist(tmp_path / "list", 1)
    results = run_all(
        {
            "bar": bundle_command(
                "batch_inference", "batch_inference.json", **batch(checkpoint, datalist, tmp_path / "out", progress=1)
            ),
            "bad": bundle_command(
                "batch_inference",
                "batch_inference.json",
                **batch(checkpoint, datalist, tmp_path / "o", progress="maybe"),
            ),
        }
    )
    succeeded(results["bar"])
    assert "propagating" in results["bar"].stderr and (tmp_path / "out" / "clip0" / "clip0_seg.nii.gz").is_file()
    refused(results["bad"], "--progress maybe", "true or false")
