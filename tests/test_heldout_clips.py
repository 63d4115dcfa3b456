"""Held-out stills and the unseen-object clips made from them (`scripts.tools.heldout_clips`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from scripts.data import list_sequences
from scripts.errors import InputError
from scripts.static_clips import HELD_OUT_EVERY, held_out, list_static_images
from scripts.tools.heldout_clips import main, write_heldout_clips

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
HELD_COLOURS = ((230, 30, 30), (30, 30, 230))  # held-out stills: red and blue objects
TRAIN_COLOUR = (30, 220, 30)  # training stills: green objects


def ids(held: bool, count: int) -> list[str]:
    """The first `count` ids of the form s<n> that are (or are not) held out."""
    return [name for name in (f"s{n}" for n in range(1000)) if held_out(name) == held][:count]


def write_still(folder: Path, name: str, colour: tuple[int, int, int]) -> None:
    """A 72×96 textured grey still with one flat-coloured square object (label 1)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    image = np.full((72, 96, 3), 100, np.uint8) + (np.indices((72, 96)).sum(0) % 7)[..., None].astype(np.uint8)
    mask = np.zeros((72, 96), np.uint8)
    image[20:52, 30:66] = colour
    mask[20:52, 30:66] = 1
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    Image.fromarray(mask).save(folder / "masks" / f"{name}.png")


@pytest.fixture()
def stills(tmp_path: Path) -> Path:
    """An image/mask folder with two held-out stills and three training stills."""
    folder = tmp_path / "polyps"
    for name, colour in zip(ids(True, 2), HELD_COLOURS):
        write_still(folder, name, colour)
    for name in ids(False, 3):
        write_still(folder, name, TRAIN_COLOUR)
    return folder


def test_held_out_is_a_fixed_fifth_by_id() -> None:
    names = [f"image_{n}" for n in range(5000)]
    share = sum(map(held_out, names)) / len(names)
    assert abs(share - 1 / HELD_OUT_EVERY) < 0.02
    assert [held_out(n) for n in names[:50]] == [held_out(n) for n in names[:50]]  # no state between calls


def test_parts_split_the_stills(stills: Path) -> None:
    train = list_static_images(str(stills))
    heldout = list_static_images(str(stills), part="heldout")
    every = list_static_images(str(stills), part="all")
    assert sorted(s.image.stem for s in heldout) == sorted(ids(True, 2))
    assert sorted(s.image.stem for s in train) == sorted(ids(False, 3))
    assert sorted(s.image for s in every) == sorted(s.image for s in train + heldout)
    with pytest.raises(ValueError, match="part must be"):
        list_static_images(str(stills), part="val")
    parser = ConfigParser()  # the static stage trains on the training part only
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "pretrain_static.json")])
    parser.update({"static_image_dirs": str(stills), "roots": []})
    assert sorted(s.image.stem for s in parser.get_parsed_content("train#images")) == sorted(ids(False, 3))


def test_heldout_clips_layout_and_content(stills: Path, tmp_path: Path) -> None:
    """The clips are DAVIS sequences of the held-out stills only, every frame annotated with uint8 labels, the same
    for the same seed, and never written over without --overwrite."""
    target = tmp_path / "clips"
    assert write_heldout_clips(str(stills), target, clips=4, frames=3, size=48, seed=5) == 12
    sequences = list_sequences(target)
    assert [s.name for s in sequences] == ["clip000", "clip001", "clip002", "clip003"]
    meta = json.loads((target / "meta.json").read_text())
    assert meta["synthetic"] is True and meta["settings"]["frames"] == 3
    for seq in sequences:
        assert len(seq.frames) == len(seq.masks) == 3
        labels = [np.array(Image.open(m)) for m in seq.masks]
        assert all(lab.dtype == np.uint8 and lab.shape == (48, 48) for lab in labels)
        assert labels[0].max() >= 1 and set(np.unique(np.stack(labels))) <= {0, 1, 2}
        for frame, lab in zip(seq.frames, labels):
            rgb = np.array(Image.open(frame)).astype(float)
            assert rgb.shape == (48, 48, 3)
            inside = rgb[lab > 0]
            if len(inside):  # objects come from red or blue stills, never from the green training stills
                r, g, b = inside.mean(0)
                assert g < max(r, b)
    again = tmp_path / "again"
    write_heldout_clips(str(stills), again, clips=4, frames=3, size=48, seed=5)
    for a, b in zip(sequences, list_sequences(again)):
        assert all(np.array_equal(np.array(Image.open(x)), np.array(Image.open(y))) for x, y in zip(a.masks, b.masks))
    before = (target / "Annotations" / "clip000" / "00000.png").read_bytes()
    with pytest.raises(InputError, match="already holds results"):
        write_heldout_clips(str(stills), target, clips=4, frames=3, size=48, seed=6)
    assert (target / "Annotations" / "clip000" / "00000.png").read_bytes() == before
    main([str(stills), str(target), "--clips", "2", "--frames", "3", "--size", "48", "--overwrite", "true"])
    assert [s.name for s in list_sequences(target)] == ["clip000", "clip001"]


def test_evaluate_scores_the_clips(stills: Path, tmp_path: Path) -> None:
    """`evaluate.json` reads the clips as any DAVIS root (the copy baseline keeps this quick)."""
    write_heldout_clips(str(stills), tmp_path / "clips", clips=2, frames=3, size=48)
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        run_id="evaluating",
        dataset_dir=str(tmp_path / "clips"),
        output_dir=str(tmp_path / "eval"),
        method="copy",
    )
    wf.initialize()
    wf.run()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_sequences"] == 2 and 0 <= metrics["J&F"] <= 1


def test_cli_errors(stills: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only_train = tmp_path / "train_only"
    write_still(only_train, ids(False, 1)[0], TRAIN_COLOUR)
    with pytest.raises(SystemExit, match="no held-out still"):
        main([str(only_train), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main([str(stills), str(tmp_path / "out"), "--frames", "1"])
    assert "--frames" in capsys.readouterr().err
