"""End-to-end evaluation on a tiny DAVIS root: outputs and their keys, refusal to overwrite, nothing left on failure."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.baselines import CopyFirstFrame, FarnebackFlow
from scripts.errors import InputError
from scripts.evaluate import Evaluation, make_propagator

SEQUENCES = ("alpha", "beta", "gamma")
NUM_FRAMES = 5
TOP_KEYS = {"J&F", "J", "F", "Dice", "HD95", "method", "dataset", "num_sequences", "num_objects", "failed"}


def make_root(root: Path, starts: dict[str, int | None] | None = None, second: dict[str, int] | None = None) -> Path:
    """3 sequences × 5 frames of a bright square moving right by 2 pixels per frame. ``starts[seq]`` is the frame
    from which the square is annotated (None: never); ``second[seq]`` adds a second object, a dark square moving
    down, annotated (and shown) from that frame on."""
    starts, second = starts or {}, second or {}
    for i, seq in enumerate(SEQUENCES):
        (root / "JPEGImages" / seq).mkdir(parents=True)
        (root / "Annotations" / seq).mkdir(parents=True)
        start = starts.get(seq, 0)
        for t in range(NUM_FRAMES):
            frame = np.full((48, 64, 3), 40, np.uint8)
            labels = np.zeros((48, 64), np.uint8)
            y, x = 10 + i, 8 + 2 * t
            frame[y : y + 16, x : x + 16] = 220
            if start is not None and t >= start:
                labels[y : y + 16, x : x + 16] = 1
            if seq in second and t >= second[seq]:
                frame[28 + t : 38 + t, 48:58] = 0
                labels[28 + t : 38 + t, 48:58] = 2
            Image.fromarray(frame).save(root / "JPEGImages" / seq / f"{t:05d}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(root / "Annotations" / seq / f"{t:05d}.png")
    return root


def test_writes_all_outputs(tmp_path, capsys):
    root = make_root(tmp_path / "tiny")
    out = tmp_path / "out"
    report = Evaluation(str(root), str(out), CopyFirstFrame(), progress=False).run()
    metrics = json.loads((out / "metrics.json").read_text())
    assert TOP_KEYS <= set(metrics) and set(metrics["sequences"]) == set(SEQUENCES)
    assert metrics["method"] == "CopyFirstFrame" and metrics["dataset"] == "tiny"
    assert metrics["num_sequences"] == 3 and metrics["num_objects"] == 3
    assert metrics["J&F"] == pytest.approx(report["J&F"]) and 0 < metrics["J"] < 1
    obj = metrics["sequences"]["alpha"]["objects"]["1"]
    assert [f["frame"] for f in obj["frames"]] == [1, 2, 3, 4]
    assert {"J&F", "J", "F", "Dice", "HD95", "Lost", "frame"} == set(obj["frames"][0])
    for seq in SEQUENCES:
        preds = sorted((out / "pred" / seq).glob("*.png"))
        assert [p.name for p in preds] == [f"{t:05d}.png" for t in range(NUM_FRAMES)]
    with (out / "per_sequence.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["sequence"] for r in rows] == list(SEQUENCES)
    assert float(rows[0]["J&F"]) == pytest.approx(metrics["sequences"]["alpha"]["J&F"], abs=1e-6)
    assert Image.open(out / "jf.png").format == "PNG"
    assert "mean over objects" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]  # no staging left behind


def test_flow_beats_copy_on_a_moving_square(tmp_path):
    root = make_root(tmp_path / "tiny")
    copy = Evaluation(str(root), str(tmp_path / "copy"), CopyFirstFrame(), progress=False).run()
    flow = Evaluation(str(root), str(tmp_path / "flow"), FarnebackFlow(), progress=False).run()
    assert flow["J&F"] > copy["J&F"]


def test_refuses_existing_output(tmp_path, capsys):
    """Other files in the output folder are fine and survive; the job's own outputs are refused or replaced."""
    root = make_root(tmp_path / "tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's notes")
    Evaluation(str(root), str(out), CopyFirstFrame(), progress=False).run()
    own = ["jf.png", "metrics.json", "per_sequence.csv", "pred"]
    assert sorted(p.name for p in out.iterdir()) == sorted(own + ["keep.txt"])
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing.startswith("wrote ") and all(str(out / name) in closing for name in own), closing
    (out / "metrics.json").write_text("earlier results")
    with pytest.raises(InputError, match="already holds results.*metrics.json"):
        Evaluation(str(root), str(out), CopyFirstFrame(), progress=False).run()
    assert (out / "metrics.json").read_text() == "earlier results"
    Evaluation(str(root), str(out), CopyFirstFrame(), overwrite=True, progress=False).run()
    assert json.loads((out / "metrics.json").read_text())["method"] == "CopyFirstFrame"
    assert (out / "keep.txt").read_text() == "the user's notes"
    assert sorted(p.name for p in out.iterdir()) == sorted(own + ["keep.txt"])  # no staging left behind


def test_objects_start_on_the_frame_that_first_annotates_them(tmp_path, capsys):
    """A sequence whose only object appears on frame 3 is scored on frame 4; in another, object 2 joins on frame 2
    and is scored on frames 3-4 while object 1 keeps frames 1-4; a sequence annotating nothing is reported (in
    metrics.json and on the console) and the others are still scored."""
    root = make_root(tmp_path / "tiny", starts={"beta": 3, "gamma": None}, second={"alpha": 2})
    out = tmp_path / "out"
    report = Evaluation(str(root), str(out), FarnebackFlow(), progress=False).run()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sequences"]) == {"alpha", "beta"} and metrics["num_objects"] == 3
    beta = metrics["sequences"]["beta"]["objects"]["1"]
    assert beta["first_frame"] == 3 and [f["frame"] for f in beta["frames"]] == [4]
    alpha = metrics["sequences"]["alpha"]["objects"]
    assert (alpha["1"]["first_frame"], [f["frame"] for f in alpha["1"]["frames"]]) == (0, [1, 2, 3, 4])
    assert (alpha["2"]["first_frame"], [f["frame"] for f in alpha["2"]["frames"]]) == (2, [3, 4])
    assert alpha["2"]["J"] > 0.5 and beta["J"] > 0.5  # the flow follows each object from its own start
    assert (
        list(metrics["failed"]) == ["tiny/gamma"] and "no frame annotates an object" in metrics["failed"]["tiny/gamma"]
    )
    assert report["failed"] == metrics["failed"]
    preds = {t: np.asarray(Image.open(out / "pred" / "alpha" / f"{t:05d}.png")) for t in range(NUM_FRAMES)}
    assert [sorted(np.unique(preds[t])) for t in range(NUM_FRAMES)] == [[0, 1], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert sorted(np.unique(np.asarray(Image.open(out / "pred" / "beta" / "00000.png")))) == [0]  # before its start
    assert not (out / "pred" / "gamma").exists()
    captured = capsys.readouterr()
    assert "warning: tiny/gamma: not scored: " in captured.err
    assert "not scored (1): tiny/gamma: " in captured.out


def test_nothing_scorable_writes_nothing(tmp_path):
    root = make_root(tmp_path / "tiny", starts={seq: None for seq in SEQUENCES})
    with pytest.raises(InputError, match="no sequence could be scored: .*gamma: no frame annotates an object"):
        Evaluation(str(root), str(tmp_path / "out"), CopyFirstFrame(), progress=False).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_split_and_sequence_filters(tmp_path):
    root = make_root(tmp_path / "tiny")
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"tiny/alpha": "val", "tiny/beta": "train", "tiny/gamma": "val"}))
    kwargs = dict(propagator=CopyFirstFrame(), split_file=str(split_file), progress=False)
    report = Evaluation(str(root), str(tmp_path / "val"), split="val", **kwargs).run()
    assert set(report["sequences"]) == {"alpha", "gamma"}
    report = Evaluation(str(root), str(tmp_path / "one"), split="val", sequences=["gamma"], **kwargs).run()
    assert set(report["sequences"]) == {"gamma"}
    split_file.write_text(json.dumps({f"tiny/{s}": "train" for s in SEQUENCES}))
    with pytest.raises(InputError, match="no sequence in split 'val'"):
        Evaluation(str(root), str(tmp_path / "none"), split="val", **kwargs).run()


def test_several_roots(tmp_path):
    roots = [make_root(tmp_path / "one"), make_root(tmp_path / "two")]
    out = tmp_path / "out"
    report = Evaluation(",".join(map(str, roots)), str(out), CopyFirstFrame(), progress=False).run()
    assert set(report["datasets"]) == {"one", "two"} and report["num_objects"] == 6
    assert report["dataset"] == "one,two"
    assert report["J&F"] == pytest.approx(np.mean([report["datasets"][d]["J&F"] for d in ("one", "two")]))
    assert (out / "pred" / "two" / "beta" / "00004.png").is_file()


def test_make_propagator():
    assert isinstance(make_propagator("copy"), CopyFirstFrame)
    assert isinstance(make_propagator("flow"), FarnebackFlow)
    model = object()
    assert make_propagator("model", model) is model
    with pytest.raises(ValueError, match="model_propagator"):
        make_propagator("model")
    with pytest.raises(ValueError, match="one of"):
        make_propagator("magic")


@pytest.mark.slow
def test_shipped_weights_segment_the_embedded_clip(tmp_path: Path) -> None:
    """The weights the Quickstart uses, on the embedded vocalfolds clip (a val sequence, never trained on), through
    evaluate.json's defaults (over inference.json): far above copying the first frame (measured 0.589 against 0.060
    when shipped)."""
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    scores = {}
    for method in ("model", "copy"):
        wf = ConfigWorkflow(
            config_file=[str(configs / "inference.json"), str(configs / "evaluate.json")],
            meta_file=str(configs / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            run_id="evaluating",
            output_dir=str(tmp_path / method),
            method=method,
            device="cpu",
        )
        wf.initialize()
        wf.run()
        scores[method] = json.loads((tmp_path / method / "metrics.json").read_text())["J&F"]
    assert scores["model"] >= 0.5, scores
    assert scores["model"] >= scores["copy"] + 0.3, scores
