"""SYNTHETIC echocardiography-like clips with exact ground truth, for tests, training and evaluation.

Not patient data: a beating left-ventricle cavity (dark ellipse whose radii follow a heartbeat, with slow drift and
rotation) inside a bright myocardium ring that thickens in systole, in a sector-shaped (fan) field of view, with
depth attenuation and multiplicative Rayleigh speckle. Labels: 1 = LV cavity, 2 = myocardium.

Every frame is a pure function of ``(t, height, width, seed)``, so clips of any length are generated lazily and
identically on every machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from scripts.outputs import write_png_labels
from scripts.readers import VideoSource, pixel_info
from scripts.staging import staged_output

CAVITY, MYOCARDIUM = 1, 2
FAN_HALF_ANGLE = np.deg2rad(40.0)


@dataclass(frozen=True)
class EchoParams:
    """Per-sequence anatomy and motion of a synthetic clip; lengths are fractions of the image height."""

    period: float  # frames per heartbeat
    phase: float  # heartbeat phase at t = 0 (rad)
    center: tuple[float, float]  # LV centre at rest (row, column), fractions of height and width
    radii: tuple[float, float]  # cavity semi-axes (long, short) at end-diastole
    angle: float  # long-axis tilt from vertical (rad)
    contraction: float  # fractional shortening of the cavity radii at end-systole
    wall: float  # myocardium thickness at end-diastole
    drift: float  # amplitude of the slow translation of the heart
    sway: float  # amplitude of the slow rotation (rad)


def echo_params(seed: int) -> EchoParams:
    """Draw one synthetic heart from ``seed``; ranges keep copy-first-frame cavity IoU around 0.5-0.8."""
    rng = np.random.default_rng(seed)
    return EchoParams(
        period=float(rng.uniform(16, 28)),
        phase=float(rng.uniform(0, 2 * np.pi)),
        center=(float(rng.uniform(0.48, 0.56)), float(rng.uniform(0.45, 0.55))),
        radii=(float(rng.uniform(0.22, 0.28)), float(rng.uniform(0.11, 0.15))),
        angle=float(rng.uniform(-0.35, 0.35)),
        contraction=float(rng.uniform(0.25, 0.35)),
        wall=float(rng.uniform(0.045, 0.06)),
        drift=float(rng.uniform(0.02, 0.04)),
        sway=float(rng.uniform(0.05, 0.12)),
    )


def _geometry(t: int, height: int, width: int, p: EchoParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Normalised elliptic radius of the cavity and of the epicardium (< 1 inside), the fan mask, and the edge width
    in those units (about one pixel)."""
    systole = 0.5 * (1 - np.cos(2 * np.pi * t / p.period + p.phase))  # 0 end-diastole .. 1 end-systole
    slow = 2 * np.pi * t / p.period
    cy = (p.center[0] + p.drift * np.sin(slow / 3.7 + p.phase)) * height
    cx = p.center[1] * width + p.drift * np.cos(slow / 2.9) * height
    angle = p.angle + p.sway * np.sin(slow / 2.3)
    long_axis, short_axis = (r * height * (1 - p.contraction * systole) for r in p.radii)
    wall = p.wall * height * (1 + 0.6 * systole)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    inner = np.sqrt((u / long_axis) ** 2 + (v / short_axis) ** 2)
    outer = np.sqrt((u / (long_axis + wall)) ** 2 + (v / (short_axis + wall)) ** 2)
    apex_y, depth = 0.03 * height, 0.95 * height
    rho, theta = np.hypot(yy - apex_y, xx - width / 2), np.arctan2(xx - width / 2, yy - apex_y)
    fan = (rho < depth) & (rho > 0.04 * height) & (np.abs(theta) < FAN_HALF_ANGLE)
    return inner, outer, fan, 1.0 / short_axis


def _labels(inner: np.ndarray, outer: np.ndarray, fan: np.ndarray) -> np.ndarray:
    return (np.where(inner < 1, CAVITY, np.where(outer < 1, MYOCARDIUM, 0)) * fan).astype(np.uint8)


def echo_labels(t: int, height: int, width: int, seed: int, params: EchoParams | None = None) -> np.ndarray:
    """Ground-truth ``H×W`` uint8 labels of synthetic frame ``t`` (1 cavity, 2 myocardium) without rendering it."""
    return _labels(*_geometry(t, height, width, params or echo_params(seed))[:3])


def echo_frame(
    t: int, height: int = 256, width: int = 256, seed: int = 0, params: EchoParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic frame ``t``: ``(H×W×3 uint8 grey image, H×W uint8 labels)``, a pure function of its arguments."""
    params = params or echo_params(seed)
    inner, outer, fan, edge = _geometry(t, height, width, params)
    rng = np.random.default_rng([seed, t])
    texture = cv2.resize(np.random.default_rng(seed).uniform(0.6, 1.4, (6, 6)).astype(np.float32), (width, height))
    tissue = 0.28 * texture
    wall = 1.0 / (1 + np.exp((outer - 1) / edge))  # smooth 0..1 inside the epicardium
    blood = 1.0 / (1 + np.exp((inner - 1) / edge))
    echo = tissue + (0.8 - tissue) * wall
    echo = echo + (0.05 - echo) * blood
    depth = np.linspace(1.0, 0.6, height, dtype=np.float32)[:, None]
    sigma = max(0.7, height / 256)
    speckle = np.hypot(
        *(cv2.GaussianBlur(rng.standard_normal((height, width), np.float32), (0, 0), sigma) for _ in "re")
    )
    speckle /= speckle.mean()  # Rayleigh amplitude with unit mean: multiplicative ultrasound speckle
    image = np.clip(echo * depth * speckle / 1.2, 0, 1) ** 0.8 * 255 * fan
    grey = image.round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), _labels(inner, outer, fan)


class SyntheticEchoSource(VideoSource):
    """A lazy synthetic echo clip (kind ``synthetic``); ``labels(t)`` gives its ground truth."""

    def __init__(self, num_frames: int, height: int = 256, width: int = 256, seed: int = 0, fps: float = 25.0):
        self.seed, self.params = seed, echo_params(seed)
        self.info = pixel_info(f"synthetic-echo(seed={seed})", "synthetic", num_frames, height, width, fps)

    def _read(self, t: int) -> np.ndarray:
        return echo_frame(t, self.info.height, self.info.width, self.seed, self.params)[0]

    def labels(self, t: int) -> np.ndarray:
        if not 0 <= t < len(self):
            raise IndexError(f"{self.info.path}: frame {t} is outside 0..{len(self) - 1}")
        return echo_labels(t, self.info.height, self.info.width, self.seed, self.params)


def write_echo_dataset(
    root: str | Path, num_sequences: int = 4, num_frames: int = 48, height: int = 256, width: int = 256, seed: int = 0
) -> Path:
    """Write a synthetic DAVIS-layout dataset: ``JPEGImages/echoNN/NNNNN.jpg``, ``Annotations/echoNN/NNNNN.png``
    and ``meta.json``. Sequence ``i`` uses seed ``1000 * seed + i``. They appear only once complete, so an
    interrupted run is never mistaken for a dataset; a ``root`` already holding one of them is refused."""
    sequences = {}
    with staged_output(root, ("JPEGImages", "Annotations", "meta.json")) as staging:
        for i in range(num_sequences):
            name, sequence_seed = f"echo{i:02d}", 1000 * seed + i
            params = echo_params(sequence_seed)
            images, annotations = staging / "JPEGImages" / name, staging / "Annotations" / name
            images.mkdir(parents=True)
            annotations.mkdir(parents=True)
            for t in range(num_frames):
                frame, labels = echo_frame(t, height, width, sequence_seed, params)
                Image.fromarray(frame).save(images / f"{t:05d}.jpg", quality=95)
                write_png_labels(annotations, t, labels)
            sequences[name] = {"seed": sequence_seed, "n_frames": num_frames, "params": asdict(params)}
        meta = {
            "dataset": "synthetic_echo",
            "modality": "SYNTHETIC echocardiography-like ultrasound (generated, no patient data)",
            "synthetic": True,
            "classes": {"0": "background", str(CAVITY): "left-ventricle cavity", str(MYOCARDIUM): "myocardium"},
            "source": "generated by scripts.synthetic.write_echo_dataset",
            "licence": "generated data, no restriction",
            "generator": {"seed": seed, "height": height, "width": width, "num_frames": num_frames},
            "sequences": sequences,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(root)


def ensure_echo_dataset(root: str | Path, seed: int = 0, num_sequences: int = 10, num_frames: int = 40) -> Path:
    """The synthetic echo training set at ``root``, written on first use; under DDP rank 0 writes it, others wait."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not (Path(root) / "JPEGImages").is_dir() and (not distributed or dist.get_rank() == 0):
        write_echo_dataset(root, num_sequences=num_sequences, num_frames=num_frames, seed=seed)
    if distributed:
        dist.barrier()
    return Path(root)
