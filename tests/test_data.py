"""Tests for scripts.data: sequence listing and splits, clip sampling, consistent augmentation, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser
from monai.transforms import Compose, Lambdad
from PIL import Image

from scripts import data
from scripts.data import (
    DEFAULT_SPLIT_FILE,
    ClipDataset,
    Sequence,
    clip_transforms,
    gap_curriculum,
    list_sequences,
    load_split,
)
from scripts.errors import InputError

H, W, FRAMES = 48, 64, 6


def augmentation(crop_size: int) -> Compose:
    """The training augmentation exactly as `train.json` declares it (`train#transforms`), for `crop_size`."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "train.json"))
    parser["crop_size"] = crop_size
    return parser.get_parsed_content("train#transforms")


def _write_sequence(root: Path, name: str, shift: int) -> None:
    """Two squares (labels 1 and 2) moving right by 3 px per frame over a dark textured background."""
    (root / "JPEGImages" / name).mkdir(parents=True)
    (root / "Annotations" / name).mkdir(parents=True)
    texture = (np.indices((H, W)).sum(0) % 7 * 8).astype(np.uint8)
    for t in range(FRAMES):
        label = np.zeros((H, W), np.uint8)
        x = 4 + 3 * t + shift
        label[8:24, slice(x, x + 16)] = 1
        label[28:40, slice(x + 20, x + 32)] = 2
        frame = np.stack([texture, texture, texture], -1)
        frame[label == 1] = (220, 40, 40)
        frame[label == 2] = (40, 220, 40)
        Image.fromarray(frame).save(root / "JPEGImages" / name / f"{t:05d}.jpg", quality=95)
        Image.fromarray(label).save(root / "Annotations" / name / f"{t:05d}.png")


@pytest.fixture(scope="module")
def davis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny DAVIS roots (``dsa``, ``dsb``), two 6-frame sequences each."""
    base = tmp_path_factory.mktemp("davis")
    for dataset in ("dsa", "dsb"):
        for i in range(2):
            _write_sequence(base / dataset, f"seq{i}", shift=2 * i)
    return base / "dsa", base / "dsb"


@pytest.fixture(scope="module")
def sequences(davis: tuple[Path, Path]) -> list[Sequence]:
    return list_sequences([str(r) for r in davis])


def _check_order(indices: np.ndarray, max_gap: int) -> int:
    """Assert consecutive gaps are all in [1, max_gap] or all in [-max_gap, -1]; return the direction."""
    gaps = np.diff(indices)
    direction = 1 if gaps[0] > 0 else -1
    assert np.all((direction * gaps >= 1) & (direction * gaps <= max_gap)), indices
    return direction


def test_list_sequences_and_split(davis: tuple[Path, Path], tmp_path: Path) -> None:
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"dsa/seq0": "val", "dsb/seq1": "train"}))
    roots = ",".join(str(r) for r in davis)
    everything = list_sequences(roots)
    assert [s.key for s in everything] == ["dsa/seq0", "dsa/seq1", "dsb/seq0", "dsb/seq1"]
    assert all(len(s.frames) == len(s.masks) == FRAMES for s in everything)
    assert all(f.stem == m.stem for s in everything for f, m in zip(s.frames, s.masks))
    assert [s.key for s in list_sequences(roots, "val", split_file)] == ["dsa/seq0"]
    # sequences the split file does not list count as train
    assert [s.key for s in list_sequences(roots, "train", split_file)] == ["dsa/seq1", "dsb/seq0", "dsb/seq1"]
    assert load_split(split_file) == {"dsa/seq0": "val", "dsb/seq1": "train"}
    with pytest.raises(ValueError, match="split must be one of"):
        list_sequences(roots, "test", split_file)


def test_invalid_inputs_name_the_path(davis: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "bare" / "JPEGImages" / "s").mkdir(parents=True)
    with pytest.raises(ValueError, match="Annotations"):
        list_sequences(str(tmp_path / "bare"))
    broken = tmp_path / "broken"
    _write_sequence(broken, "s", shift=0)
    (broken / "Annotations" / "s" / "00003.png").unlink()
    with pytest.raises(ValueError, match=r"00003\.png: label map missing"):
        list_sequences(broken)
    bad_split = tmp_path / "bad.json"
    bad_split.write_text(json.dumps({"dsa/seq0": "test"}))
    with pytest.raises(ValueError, match=str(bad_split)):
        load_split(bad_split)
    bad_split.write_text("[]")
    with pytest.raises(ValueError, match="JSON object"):
        load_split(bad_split)


@pytest.mark.parametrize("augment", [True, False])
def test_clip_shapes_and_types(sequences: list[Sequence], augment: bool) -> None:
    transforms = augmentation(32) if augment else None
    dataset = ClipDataset(sequences, num_frames=3, crop_size=32, samples_per_epoch=7, transforms=transforms)
    assert len(dataset) == 7
    clip = dataset[0]
    assert clip["image"].shape == (3, 3, 32, 32) and clip["image"].dtype == torch.float32
    assert clip["label"].shape == (3, 1, 32, 32) and clip["label"].dtype == torch.int64
    assert clip["frame_index"].shape == (3,) and clip["frame_index"].dtype == torch.int64
    assert 0 <= clip["image"].min() and clip["image"].max() <= 1
    assert 1 <= clip["num_objects"] <= 2 and clip["label"].max() <= clip["num_objects"]
    assert type(clip["image"]) is torch.Tensor  # no MetaTensor: collates like plain data


def test_frames_in_temporal_order_with_bounded_gaps(sequences: list[Sequence]) -> None:
    dataset = ClipDataset(sequences, num_frames=3, max_gap=2, crop_size=16)
    directions = {_check_order(dataset[i]["frame_index"].numpy(), 2) for i in range(40)}
    assert directions == {1, -1}  # reversed in time about half of the time
    dataset.max_gap = 1  # the curriculum handler changes it between epochs
    for i in range(10):
        _check_order(dataset[i]["frame_index"].numpy(), 1)


def test_short_sequence_repeats_frames(sequences: list[Sequence]) -> None:
    short = Sequence("dsa", "short", sequences[0].frames[:2], sequences[0].masks[:2])
    dataset = ClipDataset([short], num_frames=4, crop_size=16)
    for i in range(10):
        indices = dataset[i]["frame_index"].numpy()
        assert len(indices) == 4 and set(indices) <= {0, 1}
        assert np.all(np.diff(indices) >= 0) or np.all(np.diff(indices) <= 0)


def test_augmentation_identical_across_frames(sequences: list[Sequence]) -> None:
    still = Sequence("dsa", "still", [sequences[0].frames[2]] * FRAMES, [sequences[0].masks[2]] * FRAMES)
    dataset = ClipDataset([still], num_frames=4, crop_size=32, transforms=augmentation(32))
    for i in range(8):
        clip = dataset[i]
        for t in range(1, 4):
            assert torch.equal(clip["image"][t], clip["image"][0])
            assert torch.equal(clip["label"][t], clip["label"][0])


def test_objects_remapped_and_first_frame_annotated(sequences: list[Sequence]) -> None:
    for max_objects in (1, 2):
        dataset = ClipDataset(sequences, crop_size=24, max_objects=max_objects, transforms=augmentation(24))
        for i in range(12):
            clip = dataset[i]
            k = clip["num_objects"]
            assert 1 <= k <= max_objects
            assert set(clip["label"].unique().tolist()) <= set(range(k + 1))
            assert set(clip["label"][0].unique().tolist()) >= set(range(1, k + 1))


def test_vanished_objects_are_dropped(sequences: list[Sequence], monkeypatch: pytest.MonkeyPatch) -> None:
    drop_two = Compose([Lambdad("label", lambda x: x * (x != 2))])
    clip = ClipDataset(sequences, transforms=drop_two)[0]
    assert clip["num_objects"] == 1 and clip["label"].max() == 1
    drop_all = Compose([Lambdad("label", lambda x: x * 0)])
    monkeypatch.setattr(data, "CLIP_TRIES", 3)
    with pytest.raises(RuntimeError, match="annotated first frame"):
        ClipDataset(sequences, transforms=drop_all)[0]


def test_same_seed_and_index_give_same_clip(sequences: list[Sequence]) -> None:
    a = ClipDataset(sequences, crop_size=24, seed=5, transforms=augmentation(24))
    b = ClipDataset(sequences, crop_size=24, seed=5, cache=False, transforms=augmentation(24))
    for i in (0, 3, 1000):  # indices beyond len are valid: the sampler offsets them per epoch
        x, y = a[i], b[i]
        assert all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
    different = ClipDataset(sequences, crop_size=24, seed=6, transforms=augmentation(24))
    assert any(not torch.equal(a[i]["image"], different[i]["image"]) for i in range(3))
    assert any(not torch.equal(a[i]["image"], a[i + 1]["image"]) for i in range(3))


def test_transforms_without_augmentation_are_a_centre_crop() -> None:
    image = torch.arange(3 * 40 * 60, dtype=torch.float32).reshape(3, 40, 60) / (3 * 40 * 60)
    label = torch.zeros(1, 40, 60)
    label[0, :, 20:40] = 1
    out = clip_transforms(20)({"image": image, "label": label})
    assert tuple(out["image"].shape) == (3, 20, 20) and tuple(out["label"].shape) == (1, 20, 20)
    # short side 40 -> 20 halves the central 20-px band to columns 10:20 of 30; the centre crop drops 5 columns
    assert torch.equal(out["label"][0, 0].nonzero().flatten(), torch.arange(5, 15))


def test_gap_curriculum() -> None:
    assert [gap_curriculum(e, 10, 1, 11, 3) for e in (0, 1, 5, 7, 10)] == [1, 3, 11, 8, 3]
    assert gap_curriculum(-3, 10, 2, 8, 4) == 2 and gap_curriculum(99, 10, 2, 8, 4) == 4
    assert gap_curriculum(0, 1, 0, 5, 0) == 1  # never below 1
    with pytest.raises(ValueError):
        gap_curriculum(0, 0, 1, 2, 1)


def test_split_file_covers_shared_data(shared_data: Path) -> None:
    split = load_split(DEFAULT_SPLIT_FILE)
    keys = {s.key for s in list_sequences([str(shared_data / "cvc_clinicdb"), str(shared_data / "vocalfolds")])}
    assert keys <= set(split), sorted(keys - set(split))
    echo = {f"echo/echo{i:02d}" for i in range(10)}
    assert echo <= set(split) and {k for k in echo if split[k] == "val"} == {"echo/echo08", "echo/echo09"}
    for dataset in ("cvc_clinicdb", "vocalfolds"):
        val = [k for k in keys if k.startswith(dataset) and split[k] == "val"]
        assert 0 < len(val) < len([k for k in keys if k.startswith(dataset)])
    # DAVIS 2016 keeps its own published split, so its val sequences (a yardstick with peer numbers) never train
    davis = json.loads((shared_data / "davis2016" / "meta.json").read_text())["splits"]
    for name in ("train", "val"):
        assert {k for k, v in split.items() if k.startswith("davis2016/") and v == name} == {
            f"davis2016/{s}" for s in davis[name]
        }


def test_pack_data_shrinks_frames_keeps_labels_and_never_overwrites(davis: tuple[Path, Path], tmp_path: Path) -> None:
    """A packed root has the same sequences and frames, short side at the limit, nearest-neighbour labels."""
    from scripts.tools.pack_data import main

    target = tmp_path / "dsa"
    main([str(davis[0]), str(target), "--short-side", "24", "--quality", "90"])
    packed, original = list_sequences(target), list_sequences(davis[0])
    assert [(s.name, len(s.frames)) for s in packed] == [(s.name, len(s.frames)) for s in original]
    with Image.open(packed[0].frames[0]) as im:
        assert im.size == (32, 24)  # 64×48 scaled so the short side is 24
    labels = np.asarray(Image.open(packed[0].masks[0]))
    assert labels.shape == (24, 32) and set(np.unique(labels)) == {0, 1, 2}, "labels must not be interpolated"
    before = sorted(p.stat().st_mtime_ns for p in target.rglob("*"))
    with pytest.raises(SystemExit, match="already holds results"):
        main([str(davis[0]), str(target)])
    assert sorted(p.stat().st_mtime_ns for p in target.rglob("*")) == before


def test_training_decodes_frames_through_the_readers(tmp_path: Path) -> None:
    """Training reads frames with `readers.read_rgb`, as inference does: grey frames become RGB, a corrupt one is
    named in one `InputError`."""
    images, masks = tmp_path / "d" / "JPEGImages" / "s", tmp_path / "d" / "Annotations" / "s"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for t in range(3):
        Image.fromarray(np.full((32, 32), 40 * t, np.uint8)).save(images / f"{t:05d}.png")  # grey PNG frames
        label = np.zeros((32, 32), np.uint8)
        label[8:24, 8:24] = 1
        Image.fromarray(label).save(masks / f"{t:05d}.png")
    (seq,) = list_sequences(tmp_path / "d")
    clip = ClipDataset([seq], num_frames=2, crop_size=32, cache=False)[0]
    assert clip["image"].shape == (2, 3, 32, 32)
    assert torch.equal(clip["image"][:, 0], clip["image"][:, 2])
    (images / "00001.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="00001.png: unreadable image"):
        for i in range(20):
            ClipDataset([seq], num_frames=3, crop_size=32, cache=False)[i]


def test_dataset_weights_set_each_datasets_share_of_clips(sequences: list[Sequence]) -> None:
    class Recording(ClipDataset):
        def _read(self, path: Path, label: bool) -> np.ndarray:
            self.seen.append(path.parents[2].name)  # <root>/Annotations/<seq>/NNNNN.png: the dataset's folder
            return super()._read(path, label)

    def share_of_dsa(weights: str | None) -> float:
        dataset = Recording(sequences, crop_size=24, seed=1, dataset_weights=weights)
        picks = []
        for i in range(300):
            dataset.seen = []
            dataset[i]
            picks.append(dataset.seen[0])
        return picks.count("dsa") / len(picks)

    assert abs(share_of_dsa("dsa=3,dsb=1") - 0.75) < 0.07
    assert abs(share_of_dsa(None) - 0.5) < 0.08
    assert share_of_dsa("dsb=0") == 1.0
    assert data.parse_dataset_weights(" vocalfolds=2, davis2016=0.5 ") == {"vocalfolds": 2.0, "davis2016": 0.5}
    assert data.parse_dataset_weights("") == {}
    for bad in ("vocalfolds", "vocalfolds=-1", "=2", "vocalfolds=x", "vocalfolds=nan"):
        with pytest.raises(InputError, match="--dataset_weights"):
            data.parse_dataset_weights(bad)
    with pytest.raises(InputError, match="kvasir is not a training dataset"):
        ClipDataset(sequences, dataset_weights="kvasir=2")
    with pytest.raises(InputError, match="above 0"):
        ClipDataset(sequences, dataset_weights="dsa=0,dsb=0")
