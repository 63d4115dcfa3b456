"""Shared fixtures: repository paths, the embedded real sample, and a small synthetic clip in every input format."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from scripts.annotations import read_annotations
from scripts.outputs import LabelSeriesWriter
from scripts.overlay import write_video
from scripts.readers import open_video
from scripts.staging import staged_output
from scripts.synthetic import SyntheticEchoSource

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "bundle" / "sample" / "vocalfolds"
SAMPLE_SEQUENCE = "patient2_seq7"
# a non-trivial geometry, so tests see it survive round trips (values exact in float32)
AFFINE = np.array([[0.5, 0.0, 0.0, -12.0], [0.0, 0.25, 0.0, 30.5], [0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 0.0, 1.0]])


def write_nifti_series(
    path: Path, frames: np.ndarray, affine: np.ndarray | None = None, fps: float | None = None
) -> Path:
    """Write ``T×H×W`` frames as a NIfTI series ``W×H×1×T`` with ``affine`` and ``pixdim[4] = 1 / fps`` seconds
    (the readers' axis convention): test inputs in the layout of the NIfTI a user or a scanner gives."""
    image = nib.Nifti1Image(
        np.asarray(frames).transpose(2, 1, 0)[:, :, None, :], np.eye(4) if affine is None else affine
    )
    image.header.set_xyzt_units("mm", "sec" if fps else "unknown")
    image.header.set_zooms(image.header.get_zooms()[:3] + (1.0 / fps if fps else 1.0,))
    nib.save(image, str(path))
    return Path(path)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The embedded vocalfolds cut (DAVIS layout)."""
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's full data sets in ../shared/data; tests that need them skip visibly without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def echo_clip() -> tuple[np.ndarray, np.ndarray]:
    """An 8-frame 64×80 synthetic echo clip: ``(T×H×W×3 frames, T×H×W labels)``."""
    source = SyntheticEchoSource(8, 64, 80, seed=3)
    return np.stack(list(source)), np.stack([source.labels(t) for t in range(len(source))])


@pytest.fixture(scope="session")
def smooth_clip() -> np.ndarray:
    """Smooth moving colour gradients (``T×H×W×3``), the content the lossy video tolerance is stated for."""
    yy, xx = np.mgrid[:64, :80]
    return np.stack(
        [np.stack([128 + 100 * np.sin(xx / 9 + t / 3 + c) * np.cos(yy / 13) for c in range(3)], -1) for t in range(8)]
    ).astype(np.uint8)


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory: pytest.TempPathFactory, echo_clip, smooth_clip) -> dict[str, Path]:
    """The synthetic clip in every input format: PNG frame folder, NIfTI, DICOM cine; the smooth clip as MP4/AVI."""
    root = tmp_path_factory.mktemp("clip")
    frames, _ = echo_clip
    (root / "frames").mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "frames" / f"{t:05d}.png")
    write_nifti_series(root / "clip.nii.gz", frames[..., 0], AFFINE, fps=20.0)
    itk.imwrite(itk.image_from_array(np.ascontiguousarray(frames[..., 0])), str(root / "clip.dcm"))
    write_video(root / "clip.mp4", smooth_clip, 20.0)
    write_video(root / "clip.avi", smooth_clip, 20.0)
    return {
        "frames": root / "frames",
        "nifti": root / "clip.nii.gz",
        "dicom": root / "clip.dcm",
        "mp4": root / "clip.mp4",
        "avi": root / "clip.avi",
    }


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``mount(name, size, read_only=False)``: a tmpfs of that size mounted at ``tmp_path / name``, for full-disk,
    read-only and mount-point outputs; unmounted afterwards. Tests using it skip visibly where mounting is denied."""
    mounted = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip(f"mounting a tmpfs needs root: running as uid {os.geteuid()}")
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root: {done.stderr.decode().strip()}")
        mounted.append(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a freshly initialised, seeded lite TCMN, for tests of contracts rather than accuracy (CLI, batch)."""
    import torch

    from scripts.network import TCMN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(TCMN("lite", pretrained=False).state_dict(), path)
    return path


# ------------------------------------------------ shared by the reader, annotation and output tests
def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


def run_pipeline(video: Path, masks: list[Path], frames: list[int] | None, out: Path, overwrite: bool = False) -> None:
    """What an inference entry point does with user inputs: stage outputs, read and validate, write labels."""
    with staged_output(out, ["labels.nii.gz"], overwrite) as staging:
        source = open_video(video)
        annotations = read_annotations(masks, frames, source.info)
        first = min(annotations)
        with LabelSeriesWriter(staging / "labels.nii.gz", source.info) as writer:
            for t, _ in enumerate(source):
                writer.write(t, annotations[first])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def assert_input_error(error: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(error.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


@pytest.fixture
def clip_labels_png(tmp_path: Path, echo_clip) -> Path:
    path = tmp_path / "mask.png"
    Image.fromarray(echo_clip[1][0]).save(path)
    return path
