"""The static-image stage: synthetic-motion clips from stills, copy-paste composites, the photometric transforms, and
`pretrain_static.json` training a few iterations on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose
from PIL import Image

from scripts.errors import InputError
from scripts.static_clips import (
    RandHueShiftd,
    RandSpecularHighlightsd,
    StaticClipDataset,
    StaticImage,
    list_static_images,
)
from scripts.synthetic import write_echo_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COLOURS = {1: (230, 30, 30), 2: (30, 30, 230)}  # the still's own object (red), the object of the other still (blue)


def write_still(folder: Path, name: str, label: int, colour: tuple[int, int, int], box: tuple[int, ...]) -> None:
    """A 96×128 grey, lightly textured image with one flat-coloured rectangle labelled `label`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    y0, y1, x0, x1 = box
    image = np.full((96, 128, 3), 110, np.uint8) + (np.indices((96, 128)).sum(0) % 5)[..., None].astype(np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    image[y0:y1, x0:x1] = colour
    mask[y0:y1, x0:x1] = label
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    Image.fromarray(mask).save(folder / "masks" / f"{name}.png")


@pytest.fixture(scope="module")
def stills(tmp_path_factory: pytest.TempPathFactory) -> list[StaticImage]:
    folder = tmp_path_factory.mktemp("stills") / "polyps"
    write_still(folder, "a", 1, COLOURS[1], (20, 60, 30, 80))
    write_still(folder, "c", 1, COLOURS[2], (40, 80, 60, 100))  # ids not held out (`held_out`): both train
    return list_static_images(str(folder))


def config_transforms(crop_size: int, spatial_only: bool = False) -> tuple[Compose, Compose]:
    """`train#clip_transforms` and `train#frame_transforms` exactly as `pretrain_static.json` declares them."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "pretrain_static.json")])
    parser["crop_size"] = crop_size
    clip, frame = parser.get_parsed_content("train#clip_transforms"), parser.get_parsed_content(
        "train#frame_transforms"
    )
    if spatial_only:  # the affine and elastic deformation, without the colour changes
        frame = Compose(frame.transforms[:2])
    return clip, frame


def nearest_colour(image: torch.Tensor) -> np.ndarray:
    """Per pixel, which of the two object colours (1, 2) it shows, or 0 (neither: background grey)."""
    rgb = image.permute(1, 2, 0).numpy() * 255
    out = np.zeros(rgb.shape[:2], np.int64)
    for k, colour in COLOURS.items():
        out[np.abs(rgb - np.array(colour)).max(-1) < 40] = k
    return out


def test_mask_and_frame_move_together(stills: list[StaticImage]) -> None:
    """Under the config's affine and elastic deformations, each frame's label sits exactly on its object's pixels."""
    clip, frame = config_transforms(64, spatial_only=True)
    dataset = StaticClipDataset(stills[:1], clip, frame, num_frames=4, crop_size=64, paste_prob=0.0)
    moved = 0
    for i in range(6):
        item = dataset[i]
        for t in range(4):
            label, colour = item["label"][t, 0].numpy(), nearest_colour(item["image"][t])
            inside = label == 1
            core = inside & (colour == 1)
            assert core.sum() >= 0.85 * inside.sum()  # the labelled pixels are red (edges are blended)
            assert core.sum() >= 0.85 * (colour == 1).sum()  # and the red pixels are labelled
        moved += not torch.equal(item["label"][0], item["label"][-1])
    assert moved >= 5  # independent draws per frame: the object moves within the clip


def test_pasted_objects_keep_their_labels(stills: list[StaticImage]) -> None:
    """With copy-paste always on, the other still's (blue) object is pasted on its own path with its own label."""
    clip, frame = config_transforms(64, spatial_only=True)
    dataset = StaticClipDataset(stills, clip, frame, num_frames=4, crop_size=64, max_objects=2, paste_prob=1.0)
    pasted = 0
    for i in range(8):
        item = dataset[i]
        label = item["label"][:, 0].numpy()
        colour = np.stack([nearest_colour(f) for f in item["image"]])
        for k in range(1, item["num_objects"] + 1):
            shown = colour[label == k]
            majority = np.bincount(shown, minlength=3)[1:].argmax() + 1
            assert (shown == majority).mean() >= 0.85  # one object, one colour, across every frame
        pasted += item["num_objects"] == 2
        assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert pasted >= 4  # both objects in the first frame in most clips


def test_full_transforms_stay_in_range_and_are_reproducible(stills: list[StaticImage]) -> None:
    clip, frame = config_transforms(48)
    dataset = StaticClipDataset(stills, clip, frame, num_frames=3, crop_size=48, paste_prob=0.5, seed=3)
    again = StaticClipDataset(stills, *config_transforms(48), num_frames=3, crop_size=48, paste_prob=0.5, seed=3)
    for i in (0, 5, 1000):
        item = dataset[i]
        assert item["image"].shape == (3, 3, 48, 48) and item["image"].dtype == torch.float32
        assert item["label"].shape == (3, 1, 48, 48) and item["label"].dtype == torch.int64
        assert 0 <= item["image"].min() and item["image"].max() <= 1  # stays within uint8 range once × 255
        assert 0 <= item["label"].min() and item["label"].max() <= item["num_objects"] <= 2
        assert item["frame_index"].tolist() == [0, 1, 2]
        assert item["label"][0].unique().tolist()[1:] == list(range(1, item["num_objects"] + 1))  # all in frame 0
        other = again[i]
        assert all(torch.equal(torch.as_tensor(item[k]), torch.as_tensor(other[k])) for k in item)


def test_hue_shift_keeps_luminance_and_highlights_only_brighten() -> None:
    torch.manual_seed(0)
    image = torch.rand(6, 16, 16) * 0.6 + 0.2  # two RGB frames stacked, away from the clamp
    hue = RandHueShiftd("image", max_degrees=30, prob=1.0)
    hue.set_random_state(1)
    shifted = hue({"image": image})["image"]
    luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    torch.testing.assert_close(
        (shifted.reshape(2, 3, 16, 16) * luma).sum(1), (image.reshape(2, 3, 16, 16) * luma).sum(1)
    )
    assert not torch.allclose(shifted, image)
    label = torch.ones(1, 16, 16)
    spec = RandSpecularHighlightsd("image", prob=1.0)
    spec.set_random_state(2)
    out = spec({"image": image, "label": label})
    assert (out["image"] >= image - 1e-6).all() and out["image"].max() <= 1 and out["image"].max() > image.max()
    assert out["label"] is label


def test_list_static_images(tmp_path: Path, stills: list[StaticImage]) -> None:
    write_echo_dataset(tmp_path / "echo", num_sequences=2, num_frames=3, height=32, width=32)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"echo/echo00": "train", "echo/echo01": "val"}))
    found = list_static_images(str(stills[0].image.parents[1]), str(tmp_path / "echo"), split)
    assert [s.source for s in found] == ["polyps", "polyps", "echo/echo00", "echo/echo00", "echo/echo00"]
    (tmp_path / "bad" / "images").mkdir(parents=True)
    (tmp_path / "bad" / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bad" / "images" / "x.jpg")
    with pytest.raises(InputError, match="mask missing"):
        list_static_images(str(tmp_path / "bad"))
    with pytest.raises(InputError, match="no static training image"):
        list_static_images()


def test_pretrain_static_config_trains(tmp_path: Path, stills: list[StaticImage]) -> None:
    """`train.json` + `pretrain_static.json` runs a few iterations on generated data and writes its checkpoint."""
    write_echo_dataset(tmp_path / "echo", num_sequences=2, num_frames=4, height=64, width=64)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"echo/echo00": "train", "echo/echo01": "val"}))
    settings = {
        "dataset_dir": str(tmp_path / "echo"),
        "static_image_dirs": str(stills[0].image.parents[1]),
        "split_file": str(split),
        "output_dir": str(tmp_path / "run"),
        "synthetic_echo": False,
        "pretrained": False,
        "crop_size": 48,
        "batch_size": 2,
        "num_frames": 3,
        "num_frames_end": 3,
        "max_epochs": 1,
        "epoch_length": 3,
        "val_size": 32,
        "val_interval": 1,
        "warmup_iterations": 1,
    }
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "pretrain_static.json")]
    meta = str(CONFIGS / "metadata.json")
    wf = ConfigWorkflow(config_file=configs, meta_file=meta, logging_file=False, run_id="training", **settings)
    wf.initialize()
    assert isinstance(wf.parser.get_parsed_content("train#dataset"), StaticClipDataset)
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3 and np.isfinite(trainer.state.output[0]["loss"])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_final.pt").is_file()


def test_pack_data_packs_an_image_folder(stills: list[StaticImage], tmp_path: Path) -> None:
    """`pack_data` shrinks an image/mask folder (as Kvasir-SEG travels to a lent GPU) and keeps its layout."""
    from scripts.tools.pack_data import main

    main([str(stills[0].image.parents[1]), str(tmp_path / "packed"), "--short-side", "48"])
    packed = list_static_images(str(tmp_path / "packed"))
    assert [s.image.stem for s in packed] == [s.image.stem for s in stills]
    with Image.open(packed[0].image) as im:
        assert im.size == (64, 48) and im.format == "JPEG"  # 128×96 scaled so the short side is 48
    assert set(np.unique(np.asarray(Image.open(packed[0].mask)))) == {0, 1}  # nearest neighbour: no new labels
