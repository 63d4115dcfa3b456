"""Storage augmentation: real codec round trips change a clip the way a stored video does, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image

from scripts.data import ClipDataset, Sequence
from scripts.storage_augment import RandCompressiond, RandGrayscaled, jpeg_round_trip, video_round_trip


def smooth(t: int = 4, h: int = 48, w: int = 64) -> torch.Tensor:
    """T×3×H×W moving gradients with a bright square: content whose artefacts are measurable."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    frames = []
    for i in range(t):
        rgb = torch.stack([x, y, (x + y + 0.1 * i) % 1])
        rgb[:, 10 + i : 30 + i, 20 + 2 * i : 40 + 2 * i] = 0.95
        frames.append(rgb)
    return torch.stack(frames)


@pytest.mark.parametrize("codec", ["jpeg", "mpeg4", "libx264"])
def test_round_trips_keep_shape_and_change_pixels_a_little(codec: str) -> None:
    clip = smooth()
    transform = RandCompressiond("image", prob=1.0, codecs=[codec], jpeg_quality=(30, 30), bit_rate=(1e5, 1e5))
    out = transform({"image": clip, "label": torch.ones(4, 1, 48, 64)})
    assert out["image"].shape == clip.shape and out["image"].dtype == torch.float32
    error = (out["image"] - clip).abs().mean().item()
    assert 0.001 < error < 0.1, error  # artefacts, not a different picture
    assert torch.equal(out["label"], torch.ones(4, 1, 48, 64))


def test_stacked_clips_and_odd_sizes_come_back_in_their_shape() -> None:
    clip = smooth(3, 47, 63).reshape(9, 47, 63)
    out = RandCompressiond("image", prob=1.0, codecs=["mpeg4"])({"image": clip})["image"]
    assert out.shape == clip.shape


def test_same_seed_same_artefacts_and_prob_zero_is_identity() -> None:
    clip = smooth()
    a = RandCompressiond("image", prob=1.0).set_random_state(seed=3)({"image": clip})["image"]
    b = RandCompressiond("image", prob=1.0).set_random_state(seed=3)({"image": clip})["image"]
    assert torch.equal(a, b)
    assert RandCompressiond("image", prob=0.0)({"image": clip})["image"] is clip


def test_video_round_trip_is_a_real_codec() -> None:
    frames = (smooth().permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    low = video_round_trip(frames, "libx264", 50_000)
    high = video_round_trip(frames, "libx264", 5_000_000)
    err = [np.abs(v.astype(int) - frames).mean() for v in (low, high)]
    assert err[1] < err[0]  # more bits, fewer artefacts
    assert (
        np.abs(jpeg_round_trip(frames, 95).astype(int) - frames).mean()
        < np.abs(jpeg_round_trip(frames, 30).astype(int) - frames).mean()
    )


def test_unknown_codec_is_refused() -> None:
    with pytest.raises(ValueError, match="codecs"):
        RandCompressiond("image", codecs=["nope"])


def test_greyscale_makes_channels_equal_luma() -> None:
    clip = smooth()
    out = RandGrayscaled("image", prob=1.0)({"image": clip})["image"]
    assert out.shape == clip.shape
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    luma = 0.299 * clip[:, 0] + 0.587 * clip[:, 1] + 0.114 * clip[:, 2]
    assert torch.allclose(out[:, 0], luma, atol=1e-6)


def test_train_json_declares_storage_augmentation_for_both_stages(tmp_path) -> None:
    """The declared storage transforms run on a clip dataset's finished clips, deterministically per item."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "train.json"))
    parser["compress_prob"], parser["grey_prob"], parser["noise_prob"] = 1.0, 0.0, 0.0
    storage = parser.get_parsed_content("train#storage_transforms")
    assert isinstance(storage, Compose)
    static = ConfigParser()
    static.read_config([str(REPO / "bundle" / "configs" / p) for p in ("train.json", "pretrain_static.json")])
    assert static["train#dataset"]["storage_transforms"] == "@train#storage_transforms"
    root = tmp_path / "d"
    (root / "JPEGImages" / "s").mkdir(parents=True)
    (root / "Annotations" / "s").mkdir(parents=True)
    frames = (smooth(4, 64, 64).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(root / "JPEGImages" / "s" / f"{i:05d}.png")
        Image.fromarray((f[..., 0] > 200).astype(np.uint8)).save(root / "Annotations" / "s" / f"{i:05d}.png")
    seq = Sequence(
        "d", "s", sorted((root / "JPEGImages" / "s").iterdir()), sorted((root / "Annotations" / "s").iterdir())
    )
    clean = ClipDataset([seq], crop_size=64, seed=1)
    stored = ClipDataset([seq], crop_size=64, seed=1, storage_transforms=storage)
    a, b, c = clean[0], stored[0], stored[0]
    assert torch.equal(a["label"], b["label"]) and torch.equal(b["image"], c["image"])
    assert 0 < (a["image"] - b["image"]).abs().mean() < 0.1
