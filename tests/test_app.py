"""The browser app's API (FastAPI's test client): opening every input format, safety, annotations, propagation,
corrections, the queue and export; plus the `app` command itself (slow: a real `python -m monai.bundle run app`)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, SAMPLE, SAMPLE_SEQUENCE
from fastapi.testclient import TestClient
from PIL import Image

from scripts.annotations import read_label_series
from scripts.app import create_app
from scripts.app_state import AppState
from scripts.inferer import ModelPropagator, PropagationInferer
from scripts.network import TCMN
from scripts.predict import Prediction
from scripts.synthetic import SyntheticEchoSource

FORMATS = ("frames", "nifti", "mp4", "avi", "dicom")


@pytest.fixture(scope="module")
def propagator() -> ModelPropagator:
    """A seeded, untrained lite TCMN at a small size: the app's results are compared with the job's, not scored."""
    torch.manual_seed(0)
    return ModelPropagator(TCMN("lite", pretrained=False), PropagationInferer(size=32, device="cpu"))


@pytest.fixture
def data_dir(tmp_path: Path, clip_files: dict[str, Path], echo_clip) -> Path:
    """--data_dir holding the clip in every format and a mask, beside a secret file outside it."""
    root = tmp_path / "data"
    root.mkdir()
    for path in clip_files.values():
        (shutil.copytree if path.is_dir() else shutil.copy)(path, root / path.name)
    (root / "masks").mkdir()
    Image.fromarray(echo_clip[1][0]).save(root / "masks" / "frame0.png")
    (tmp_path / "secret.txt").write_text("not for the page")
    os.symlink(tmp_path / "secret.txt", root / "escape.nii.gz")
    return root


@pytest.fixture
def client(tmp_path: Path, data_dir: Path, propagator: ModelPropagator):
    state = AppState(
        propagator, data_dir, tmp_path / "out", max_upload_bytes=2**20, sample=SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE
    )
    with TestClient(create_app(state)) as test_client:
        test_client.app_state = state
        yield test_client
    state.close()
    assert not state.workdir.exists()


def wait(client: TestClient, job: dict, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < end, job
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def annotate(client: TestClient, video: dict, t: int, labels: np.ndarray) -> dict:
    response = client.put(f"/api/videos/{video['id']}/annotations/{t}", content=labels.tobytes())
    assert response.status_code == 200, response.text
    return response.json()


def labels_of(client: TestClient, video: dict, t: int) -> tuple[str, np.ndarray | None]:
    response = client.get(f"/api/videos/{video['id']}/labels/{t}")
    assert response.status_code == 200, response.text
    if not response.content:
        return response.headers["X-Labels"], None
    return response.headers["X-Labels"], np.frombuffer(response.content, np.uint8).reshape(video["height"], -1)


def refused(response, status: int, *phrases: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert "\n" not in detail and all(p in detail for p in phrases), detail


def test_every_format_opens_and_streams_frames(client: TestClient, data_dir: Path, clip_files, echo_clip) -> None:
    """Each input format the CLI reads opens from --data_dir; a frame is a JPEG of the video's size; the listing
    shows folders, videos and masks."""
    listing = client.get("/api/browse").json()
    kinds = {e["name"]: e["kind"] for e in listing["entries"]}
    assert kinds["frames"] == "folder" and kinds["clip.mp4"] == "video" and kinds["clip.dcm"] == "video"
    assert [e["name"] for e in client.get("/api/browse", params={"path": "masks"}).json()["entries"]] == ["frame0.png"]
    for name in FORMATS:
        video = client.post("/api/open", json={"path": clip_files[name].name}).json()
        assert (video["num_frames"], video["height"], video["width"]) == (8, 64, 80), (name, video)
        frame = client.get(f"/api/videos/{video['id']}/frames/7")
        assert frame.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(frame.content)).size == (80, 64)
        assert labels_of(client, video, 0) == ("none", None)
    refused(client.get(f"/api/videos/{video['id']}/frames/8"), 400, "frame 8 is outside 0..7")
    workdir = client.app_state.sessions[video["id"]].workdir
    assert client.delete(f"/api/videos/{video['id']}").status_code == 200 and not workdir.exists()
    refused(client.get(f"/api/videos/{video['id']}/frames/0"), 404, f"no open video {video['id']}")
    refused(client.get("/api/videos/999"), 404, "no open video 999")


def test_paths_outside_data_dir_are_never_read(client: TestClient, tmp_path: Path) -> None:
    """`..`, absolute paths and a link leading out are refused (403) naming the path; so is browsing them."""
    secret = str(tmp_path / "secret.txt")
    refused(client.post("/api/open", json={"path": "clip.mp4\x00.txt"}), 403, "NUL byte")
    for path in ("../secret.txt", "masks/../../secret.txt", secret, "/etc/passwd", "escape.nii.gz"):
        refused(client.post("/api/open", json={"path": path}), 403, path)
        refused(client.get("/api/browse", params={"path": path}), 403, path)
    refused(client.post("/api/open", json={"path": "missing.mp4"}), 400, "missing.mp4", "no such file or directory")


def test_uploads_bad_files_and_the_size_limit(client: TestClient, clip_files, tmp_path: Path) -> None:
    """An uploaded file or frame folder opens under its own name; the CLI's refusals come back as one line; an upload
    over --max_upload_mb is refused from its size alone."""
    with open(clip_files["nifti"], "rb") as f:
        video = client.post("/api/upload", files={"files": ("clip.nii.gz", f)}).json()
    assert (video["name"], video["num_frames"], video["kind"]) == ("clip.nii.gz", 8, "nifti")
    frames = [("files", (p.name, p.read_bytes())) for p in sorted(clip_files["frames"].iterdir())]
    video = client.post("/api/upload", files=frames, data={"folder": "frames"}).json()
    assert (video["name"], video["num_frames"], video["kind"]) == ("frames", 8, "frames")
    uploads = sorted(client.app_state.workdir.glob("upload-*"))
    response = client.post("/api/upload", files={"files": ("broken.mp4", b"not a video")})
    refused(response, 400, "broken.mp4: unreadable video")
    assert str(client.app_state.workdir) not in response.json()["detail"]  # the user's name, not the app's copy
    refused(client.post("/api/upload", files={"files": ("notes.txt", b"text")}), 400, "notes.txt", "unsupported")
    refused(client.post("/api/upload", files={"files": ("big.mp4", bytes(2**20 + 1))}), 413, "over the limit")
    assert sorted(client.app_state.workdir.glob("upload-*")) == uploads  # refused uploads leave nothing


def test_annotations_and_mask_files_are_checked_like_the_cli(client: TestClient, clip_files, echo_clip) -> None:
    """Painted label maps of the wrong size are refused; mask files go through --mask's checks; all-zero unpins."""
    video = client.post("/api/open", json={"path": "clip.nii.gz"}).json()
    refused(client.put(f"/api/videos/{video['id']}/annotations/0", content=b"\x01" * 10), 400, "expected 64×80")
    small = io.BytesIO()
    Image.fromarray(echo_clip[1][0][:32, :32]).save(small, format="PNG")
    response = client.post(f"/api/videos/{video['id']}/masks", files={"file": ("small.png", small.getvalue())})
    refused(response, 400, "small.png: mask is 32×32 (H×W)", "64×80")
    response = client.post(f"/api/videos/{video['id']}/masks", files={"file": ("empty.png", _png(np.zeros((64, 80))))})
    refused(response, 400, "empty.png", "no foreground")
    response = client.post(
        f"/api/videos/{video['id']}/masks", params={"frame": 3}, files={"file": ("m.png", _png(echo_clip[1][3]))}
    )
    assert response.json()["loaded"] == [3] and response.json()["annotated"] == [3]
    kind, values = labels_of(client, video, 3)
    assert kind == "annotation"
    np.testing.assert_array_equal(values, echo_clip[1][3])
    assert annotate(client, video, 3, np.zeros((64, 80), np.uint8))["annotated"] == []
    loaded = client.post(
        f"/api/videos/{video['id']}/data_masks", params={"frame": 2}, json={"path": "masks/frame0.png"}
    )
    assert loaded.json()["loaded"] == [2]
    refused(client.post(f"/api/videos/{video['id']}/data_masks", json={"path": "../secret.txt"}), 403, "..")
    annotate(client, video, 2, np.zeros((64, 80), np.uint8))
    refused(client.post(f"/api/videos/{video['id']}/propagate"), 400, "annotate at least one frame")


def _png(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.asarray(values, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _cli_result(tmp_path: Path, propagator, video: Path, masks: dict[int, np.ndarray], name: str) -> np.ndarray:
    """The inference job (`Prediction`, what `python -m monai.bundle run inference` runs) on the same annotations."""
    files = []
    for t, values in masks.items():
        files.append(tmp_path / f"{name}_{t}.png")
        Image.fromarray(values).save(files[-1])
    out = tmp_path / f"cli_{name}"
    Prediction(str(video), [str(f) for f in files], propagator, str(out), mask_frame=list(masks)).run()
    return read_label_series(next(out.glob("*_seg.nii.gz")))


def test_propagate_correct_and_export_match_the_inference_job(
    client: TestClient, clip_files, echo_clip, propagator, tmp_path: Path
) -> None:
    """Propagation gives the job's labels; a correction pins its frame and recomputes every other frame (nothing
    when nothing changed); export writes the job's files with the input's geometry and the CLI's overwrite rules."""
    video = client.post("/api/open", json={"path": "clip.nii.gz"}).json()
    first = echo_clip[1][0]
    annotate(client, video, 0, first)
    job = wait(client, client.post(f"/api/videos/{video['id']}/propagate").json())
    assert (job["state"], job["done"], job["recomputed"]) == ("done", 8, 7), job
    expected = _cli_result(tmp_path, propagator, clip_files["nifti"], {0: first}, "one")
    for t in range(8):
        np.testing.assert_array_equal(labels_of(client, video, t)[1], expected[t])
    correction = np.where(echo_clip[1][5] > 0, 2, 0).astype(np.uint8)
    annotate(client, video, 5, correction)
    assert not client.get(f"/api/videos/{video['id']}").json()["up_to_date"]
    refused(client.post(f"/api/videos/{video['id']}/export", json={"destination": "folder"}), 409, "propagate")
    job = wait(client, client.post(f"/api/videos/{video['id']}/propagate").json())
    assert (job["state"], job["recomputed"]) == ("done", 6), job  # the two annotated frames are not recomputed
    assert wait(client, client.post(f"/api/videos/{video['id']}/propagate").json())["recomputed"] == 0
    expected = _cli_result(tmp_path, propagator, clip_files["nifti"], {0: first, 5: correction}, "two")
    out = client.app_state.output_dir
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    options = {"destination": "folder", "save_png": True, "save_overlay": True}
    written = client.post(f"/api/videos/{video['id']}/export", json=options).json()["written"]
    assert sorted(Path(p).name for p in written) == ["clip", "clip_overlay.mp4", "clip_seg.nii.gz"]
    np.testing.assert_array_equal(read_label_series(out / "clip_seg.nii.gz"), expected)
    np.testing.assert_array_equal(read_label_series(out / "clip"), expected)
    seg, source = nib.load(out / "clip_seg.nii.gz"), nib.load(clip_files["nifti"])
    np.testing.assert_allclose(seg.affine, source.affine)
    np.testing.assert_allclose(seg.affine, AFFINE)
    assert seg.shape == source.shape
    response = client.post(f"/api/videos/{video['id']}/export", json=options)
    refused(response, 400, str(out), "already holds results", "clip_seg.nii.gz", 'tick "overwrite earlier results"')
    assert "--overwrite" not in response.json()["detail"]  # a page user has no flags to pass
    assert client.post(f"/api/videos/{video['id']}/export", json={**options, "overwrite": True}).status_code == 200
    assert sorted(p.name for p in out.iterdir()) == ["clip", "clip_overlay.mp4", "clip_seg.nii.gz", "notes.txt"]
    download = client.post(f"/api/videos/{video['id']}/export", json={"save_png": True})
    assert download.headers["content-disposition"].endswith('filename="clip_results.zip"')
    with zipfile.ZipFile(io.BytesIO(download.content)) as zipped:
        assert "clip_seg.nii.gz" in zipped.namelist() and "clip/00007.png" in zipped.namelist()
    single = client.post(f"/api/videos/{video['id']}/export", json={})
    assert single.headers["content-disposition"].endswith('filename="clip_seg.nii.gz"')


class GatedPropagator:
    """Wraps a propagator: waits for `gate` before each frame, or fails, to test the queue without a slow model."""

    def __init__(self, inner, fail: bool = False) -> None:
        self.inner, self.fail, self.gate = inner, fail, threading.Event()

    def propagate(self, source, annotations):
        if self.fail:
            raise RuntimeError("the model ran out of memory")
        for item in self.inner.propagate(source, annotations):
            assert self.gate.wait(60)
            yield item


def test_one_propagation_at_a_time_queue_cancel_and_failures(propagator, clip_files, echo_clip, tmp_path) -> None:
    """A second video waits with its position shown; a repeated request joins the waiting job; cancel stops a
    running job; a failing propagation is reported and the server keeps answering."""
    gated = GatedPropagator(propagator)
    state = AppState(gated, clip_files["frames"].parent, tmp_path / "out")
    try:
        client = TestClient(create_app(state))
        videos = [client.post("/api/open", json={"path": name}).json() for name in ("clip.nii.gz", "frames")]
        for video in videos:
            annotate(client, video, 0, echo_clip[1][0])
        first = client.post(f"/api/videos/{videos[0]['id']}/propagate").json()
        second = client.post(f"/api/videos/{videos[1]['id']}/propagate").json()
        third = client.post(f"/api/videos/{videos[0]['id']}/propagate").json()
        fourth = client.post(f"/api/videos/{videos[0]['id']}/propagate").json()
        assert fourth["id"] == third["id"]  # joined the waiting job
        while client.get(f"/api/jobs/{first['id']}").json()["state"] == "queued":
            time.sleep(0.01)
        assert client.get(f"/api/jobs/{second['id']}").json()["position"] == 1
        assert client.get(f"/api/jobs/{third['id']}").json()["position"] == 2
        assert client.post(f"/api/jobs/{first['id']}/cancel").status_code == 200
        gated.gate.set()
        assert wait(client, client.get(f"/api/jobs/{first['id']}").json())["state"] == "cancelled"
        assert wait(client, second)["state"] == "done" and wait(client, third)["state"] == "done"
        gated.fail = True
        annotate(client, videos[1], 3, echo_clip[1][3])
        failed = wait(client, client.post(f"/api/videos/{videos[1]['id']}/propagate").json())
        assert failed["state"] == "failed" and "ran out of memory" in failed["error"]
        assert client.get(f"/api/videos/{videos[1]['id']}").status_code == 200
        refused(client.get("/api/jobs/999"), 404, "no propagation job 999")
    finally:
        state.close()


def test_a_long_video_is_never_decoded_whole(propagator, tmp_path: Path, monkeypatch) -> None:
    """Opening a 3,000-frame video and showing a frame decodes that frame only."""
    reads = []

    class Counting(SyntheticEchoSource):
        def _read(self, t: int) -> np.ndarray:
            reads.append(t)
            return super()._read(t)

    monkeypatch.setattr("scripts.app_state.open_video", lambda path: Counting(3000, 48, 64, seed=1))
    state = AppState(propagator, tmp_path, tmp_path / "out")
    try:
        client = TestClient(create_app(state))
        video = client.post("/api/open", json={"path": "long"}).json()
        assert video["num_frames"] == 3000
        assert client.get(f"/api/videos/{video['id']}/frames/1500").status_code == 200
        assert client.get(f"/api/videos/{video['id']}/frames/1500").status_code == 200
        assert reads == [1500]
    finally:
        state.close()


def test_the_page_and_the_sample(client: TestClient) -> None:
    """The page and its scripts are served (no external URL in them); the embedded sample opens."""
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    for name in ("index.html", "app.js", "style.css"):
        text = client.get(f"/{name}").text
        assert "http://" not in text and "https://" not in text, name
    assert client.get("/api/info").json()["sample"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_app_command_serves_until_interrupted(tmp_path: Path) -> None:
    """The README's command prints the URL, serves on 127.0.0.1, and stops on Ctrl-C (SIGINT), removing its
    scratch folder; a bad port, a missing --data_dir and a port already taken are refused with one line."""
    from test_cli import TRUSTED_CONFIGS, bundle_command
    from test_cli import refused as cli_refused
    from test_cli import run_all

    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": TRUSTED_CONFIGS, "TMPDIR": str(tmp_path)}
    command = bundle_command("app", "app.json", port=port, data_dir=tmp_path, device="cpu")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] and "http://" not in lines[-1]:
            lines.append(proc.stdout.readline())
        assert f"http://127.0.0.1:{port}/" in lines[-1], "".join(lines) + proc.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=30) as response:
            assert b'"data_dir":true' in response.read()
        assert any(p.name.startswith("tcmn-app-") for p in tmp_path.iterdir())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert not any(p.name.startswith("tcmn-app-") for p in tmp_path.iterdir())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        results = run_all(
            {
                "port": bundle_command("app", "app.json", port="eighty"),
                "data_dir": bundle_command("app", "app.json", data_dir=tmp_path / "nowhere", device="cpu"),
                "taken": bundle_command("app", "app.json", port=busy, device="cpu"),
            }
        )
    cli_refused(results["port"], "--port", "integer")
    cli_refused(results["data_dir"], str(tmp_path / "nowhere"), "--data_dir is not a folder")
    cli_refused(results["taken"], f"--port {busy}", "cannot listen there")
