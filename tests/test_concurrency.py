"""One job at a time per output folder, ranks that end with their launcher, and staging that killed jobs left behind
(scripts.staging `output_lock` and `remove_stale_staging`, scripts.distributed `die_with_launcher`).

The unmarked tests run jobs in-process against a lock held through another open file (flock locks belong to an open
file, so this is a second holder even within one process) and staging folders named after ended and running
processes. The slow ones use real processes and signals: a `torchrun --nproc_per_node 2` batch whose launcher's
process group is killed with SIGKILL, a second job started on its folder meanwhile, and a single inference killed
mid-propagation.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, SAMPLE_SEQUENCE
from PIL import Image
from test_batch import batch, torchrun, write_datalist
from test_cli import REPO, TRUSTED_CONFIGS, bundle_command, no_leftovers, run_all, succeeded

from scripts.baselines import CopyFirstFrame
from scripts.batch import REPORT, BatchPrediction
from scripts.errors import InputError
from scripts.evaluate import Evaluation
from scripts.predict import Prediction
from scripts.staging import LOCK_NAME, STAGING_PREFIX, output_lock, remove_stale_staging, staged_output
from scripts.synthetic import write_echo_dataset


def ended_pid() -> int:
    """A pid no process has now (counting down from the kernel's largest), as a killed job's pid is."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def gone(pid: int) -> bool:
    """The process has ended: no such pid, or a zombie whose exit status nobody collected yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def hold_lock(directory: Path, holder: str) -> int:
    """Lock `directory` as another job would (its own open file of the lock), saying `holder`; returns the fd."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(handle, holder.encode())
    return handle


def test_every_job_refuses_a_folder_another_job_holds(tmp_path: Path, echo_clip) -> None:
    """Inference (also the app's export), batch inference and evaluation are refused with one line naming the job
    that holds the folder, write nothing and leave the holder's lock; once it is released each runs, and the lock
    file goes with the job."""
    frames, labels = echo_clip
    (tmp_path / "clip").mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "clip" / f"{t:05d}.png")
    Image.fromarray(labels[0]).save(tmp_path / "mask.png")
    datalist = write_datalist(tmp_path / "list", 1)
    dataset = write_echo_dataset(tmp_path / "echo", num_sequences=1, num_frames=3, height=32, width=32)
    out = tmp_path / "out"
    jobs = {
        "inference": lambda: Prediction(str(tmp_path / "clip"), str(tmp_path / "mask.png"), CopyFirstFrame(), str(out)),
        "batch": lambda: BatchPrediction(str(datalist), str(out), CopyFirstFrame()),
        "evaluation": lambda: Evaluation(str(dataset), str(out), CopyFirstFrame(), progress=False),
    }
    holder = "pid 4242 on elsewhere, started 2026-01-01 00:00:00 UTC: python -m monai.bundle run inference"
    handle = hold_lock(out, holder)
    try:
        for name, job in jobs.items():
            with pytest.raises(InputError) as error:
                job().run()
            message = str(error.value)
            assert message.startswith(f"{out}: another job is writing into this folder ({holder})"), name
            assert "\n" not in message
            assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], name
    finally:
        os.close(handle)
    for job in jobs.values():
        job().run()
    assert sorted(p.name for p in out.iterdir()) == [
        "batch_report.json",
        "clip0",
        "clip_seg.nii.gz",
        "jf.png",
        "metrics.json",
        "per_sequence.csv",
        "pred",
    ]
    no_leftovers(out)


def test_lock_is_reentrant_names_its_holder_and_leaves_nothing(tmp_path: Path) -> None:
    """A job's own nested writes share its lock; the lock file names the job while it runs and is gone after, with
    the folder it had to create when nothing else was written."""
    out = tmp_path / "new" / "out"
    with output_lock(out) as locked:
        assert locked == out.resolve()
        holder = (out / LOCK_NAME).read_text()
        assert holder.startswith(f"pid {os.getpid()} on ") and "started" in holder
        with staged_output(out, ["a.txt"]) as staging:
            (staging / "a.txt").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with output_lock(tmp_path / "unused"):
        pass
    assert not (tmp_path / "unused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_jobs_clear_staging_of_ended_processes_only(tmp_path: Path, echo_clip) -> None:
    """A job removes the staging folders of processes that no longer run (and those without a pid, from an earlier
    version), keeps a running process's, puts back earlier results a killed hand-over had set aside, and keeps a
    staging folder whose set-aside results cannot go back, so nothing of the user's is lost."""
    frames, labels = echo_clip
    (tmp_path / "clip").mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "clip" / f"{t:05d}.png")
    Image.fromarray(labels[0]).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    dead, alive = ended_pid(), os.getppid()
    stale = out / f"{STAGING_PREFIX}{dead}.k1llst"
    (stale / "clip").mkdir(parents=True)
    (stale / ".x1y2.labels").write_bytes(bytes(1000))  # a killed inference's label buffer
    legacy = out / f"{STAGING_PREFIX}abcd1234"
    legacy.mkdir()
    running = out / f"{STAGING_PREFIX}{alive}.runnin"
    running.mkdir()
    handed = out / f"{STAGING_PREFIX}{dead}.handed"
    (handed / ".replaced").mkdir(parents=True)
    (handed / ".replaced" / "earlier_seg.nii.gz").write_bytes(b"the earlier result")
    clash = out / f"{STAGING_PREFIX}{dead}.clash0"
    (clash / ".replaced").mkdir(parents=True)
    (clash / ".replaced" / "notes.txt").write_bytes(b"earlier notes")
    (out / "notes.txt").write_text("the user's notes")

    Prediction(str(tmp_path / "clip"), str(tmp_path / "mask.png"), CopyFirstFrame(), str(out)).run()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["clip_seg.nii.gz", "earlier_seg.nii.gz", "notes.txt", running.name, clash.name]
    )
    assert (out / "earlier_seg.nii.gz").read_bytes() == b"the earlier result"
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert (clash / ".replaced" / "notes.txt").read_bytes() == b"earlier notes"
    assert remove_stale_staging(out) == []  # what is left is either running or kept on purpose


@pytest.mark.slow
def test_killed_torchrun_batch_takes_its_ranks_and_a_second_job_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    """`torchrun --nproc_per_node 2` batch: while it runs, a second batch on the same folder ends with one line
    naming the first (rank 0, the lock's holder) and writes nothing; `kill -9` of torchrun's process group ends both
    ranks (each in its own session) within seconds; a rerun at once then finishes the list, clearing what the killed
    ranks left."""
    datalist = write_datalist(tmp_path / "list", 6)
    out = tmp_path / "out"
    options = batch(checkpoint, datalist, out, size=128)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": TRUSTED_CONFIGS}
    log = (tmp_path / "torchrun.log").open("w")
    launcher = subprocess.Popen(
        torchrun("batch_inference", "batch_inference.json", 2, **options),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 300
        holder = ""
        while time.monotonic() < deadline and launcher.poll() is None:
            holder = (out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""
            if holder:
                break
            time.sleep(0.05)
        assert holder, f"the batch never took its folder's lock:\n{(tmp_path / 'torchrun.log').read_text()[-3000:]}"
        ranks = children(launcher.pid)
        assert len(ranks) == 2 and all(os.getsid(r) == r for r in ranks)  # each rank leads its own session
        holder_pid = int(holder.split()[1])
        assert holder_pid in ranks
        for rank in ranks:  # hold the ranks still while the second job starts, so the first surely still runs
            os.kill(rank, signal.SIGSTOP)
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        second = run_all({"second": bundle_command("batch_inference", "batch_inference.json", **options)})["second"]
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {out}: another job is writing into this folder (pid {holder_pid} on "), last
        assert "batch_inference" in last
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        for rank in ranks:
            os.kill(rank, signal.SIGCONT)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 5
        while not all(gone(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(r) for r in ranks), "ranks outlived their launcher"
    finally:
        log.close()
        for pid in [launcher.pid, *ranks]:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    rerun = run_all({"rerun": bundle_command("batch_inference", "batch_inference.json", **options)})["rerun"]
    succeeded(rerun)
    report = json.loads((out / REPORT).read_text())
    assert report["failed"] == 0 and report["done"] + report["skipped"] == 6 and report["done"] > 0
    for i in range(6):
        no_leftovers(out / f"clip{i}")
    no_leftovers(out)


@pytest.mark.slow
def test_killed_inference_leaves_staging_that_the_rerun_clears(tmp_path: Path, checkpoint: Path) -> None:
    """`kill -9` of a real inference mid-propagation leaves its hidden staging folder (its label buffer inside);
    the rerun succeeds, removes it, and keeps the staging of a process that still runs."""
    out = tmp_path / "out"
    command = bundle_command(
        "inference",
        "inference.json",
        video=SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE,
        mask=SAMPLE / "Annotations" / SAMPLE_SEQUENCE / "00000.png",
        output_dir=out,
        ckpt_path=checkpoint,
        device="cpu",
        size=128,
        progress="false",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": TRUSTED_CONFIGS}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    buffers: list[Path] = []
    deadline = time.monotonic() + 300
    while not buffers and job.poll() is None and time.monotonic() < deadline:
        buffers = list(out.glob(f"{STAGING_PREFIX}{job.pid}.*/.*.labels")) if out.is_dir() else []
        time.sleep(0.02)
    job.kill()
    _, stderr = job.communicate()
    assert buffers, f"the job never started propagating:\n{stderr[-3000:]}"
    (stale,) = out.glob(f"{STAGING_PREFIX}{job.pid}.*")
    assert buffers[0].parent == stale and not (out / f"{SAMPLE_SEQUENCE}_seg.nii.gz").exists()
    running = out / f"{STAGING_PREFIX}{os.getpid()}.mine00"  # this test process runs
    running.mkdir()
    succeeded(run_all({"rerun": command})["rerun"])
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{SAMPLE_SEQUENCE}_seg.nii.gz", running.name])
