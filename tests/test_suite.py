"""The evaluation suite (`scripts.tools.suite`, `suite_sets`, `suite_stats`): bootstrap intervals, the shipping rule,
stored-video sets, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.tools.suite import main, parse_args
from scripts.tools.suite_sets import STORAGE, SuiteSet, prepare_sets, write_stored_set
from scripts.tools.suite_stats import bootstrap_means, estimate, interval, shipping_verdict, summarise

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "bundle" / "models" / "model.pt"


# ---------------------------------------------------------------------------------------------------------- statistics
def test_equal_sequence_scores_give_a_zero_width_interval() -> None:
    result = estimate([(np.full(7, 0.7), np.arange(1, 8))], resamples=500, seed=0)
    assert result["J&F"] == pytest.approx(0.7)
    assert result["interval"] == pytest.approx([0.7, 0.7])


def test_percentile_interval_by_hand() -> None:
    # 0..100: the 2.5th and 97.5th percentiles with linear interpolation are 2.5 and 97.5
    assert interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert interval(np.arange(101.0), level=0.5) == pytest.approx((25.0, 75.0))


def test_bootstrap_of_two_sequences() -> None:
    # two sequences scoring 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 95 %
    # interval spans 0 to 1; weighted 3:1 by objects the middle case is (0·3 + 1·1) / 4 = 0.25
    result = estimate([(np.array([0.0, 1.0]), np.array([1, 1]))], resamples=2000, seed=0)
    assert result["J&F"] == pytest.approx(0.5)
    assert result["interval"] == pytest.approx([0.0, 1.0])
    means = bootstrap_means(np.array([0.0, 1.0]), np.array([3, 1]), 4000, np.random.default_rng(1))
    assert set(np.round(means, 6)) == {0.0, 0.25, 1.0}
    assert np.mean(means == 0.25) == pytest.approx(0.5, abs=0.03)
    assert estimate([(np.array([0.0, 1.0]), np.array([3, 1]))], 100, 0)["J&F"] == pytest.approx(0.25)


def test_bootstrap_is_seeded_and_stratified() -> None:
    groups = [(np.array([0.2, 0.4, 0.9]), np.ones(3)), (np.full(4, 0.6), np.ones(4))]
    first, again = estimate(groups, 300, [0, 5]), estimate(groups, 300, [0, 5])
    assert first == again
    assert first["J&F"] == pytest.approx((0.5 + 0.6) / 2)  # each set counts once, whatever its size
    low, high = first["interval"]
    assert (0.2 + 0.6) / 2 <= low < first["J&F"] < high <= (0.9 + 0.6) / 2


# ------------------------------------------------------------------------------------------------------ shipping rule
def diff(value: float, low: float, high: float) -> dict:
    return {"J&F": value, "interval": [low, high]}


def test_verdict_ships_when_the_medical_mean_rises_beyond_its_interval() -> None:
    sets = {"cvc_val": diff(0.04, 0.01, 0.07), "davis_val": diff(-0.01, -0.03, 0.01)}  # davis: within its interval
    verdict = shipping_verdict(sets, diff(0.03, 0.005, 0.05))
    assert verdict["ships"] and verdict["medical_rises"] and verdict["falling_sets"] == []


def test_verdict_refuses_a_rise_within_its_interval() -> None:
    verdict = shipping_verdict({"cvc_val": diff(0.04, 0.01, 0.07)}, diff(0.02, -0.01, 0.05))
    assert not verdict["ships"] and not verdict["medical_rises"]
    assert "not above 0" in verdict["reason"]


def test_verdict_refuses_a_set_falling_beyond_its_interval() -> None:
    sets = {"cvc_val": diff(0.06, 0.03, 0.09), "vocalfolds_val@avi": diff(-0.05, -0.08, -0.01)}
    verdict = shipping_verdict(sets, diff(0.05, 0.02, 0.08))
    assert not verdict["ships"] and verdict["medical_rises"]
    assert verdict["falling_sets"] == ["vocalfolds_val@avi"]


def test_verdict_small_sets_veto_only_beyond_the_tolerance() -> None:
    """Rule v2: a 2-sequence set's interval is the span of two differences; it vetoes only past 0.03 J&F."""
    medical = diff(0.05, 0.02, 0.08)
    small = {"cvc_val": diff(0.06, 0.03, 0.09), "vocalfolds_val": diff(-0.026, -0.038, -0.015)}
    sizes = {"cvc_val": 5, "vocalfolds_val": 2}
    assert shipping_verdict(small, medical, sizes)["ships"]
    assert not shipping_verdict(small, medical)["ships"]  # sizes unknown: the interval rule
    small["vocalfolds_val"] = diff(-0.031, -0.04, 0.02)  # beyond the tolerance, even with an interval across 0
    verdict = shipping_verdict(small, medical, sizes)
    assert not verdict["ships"] and verdict["falling_sets"] == ["vocalfolds_val"]
    assert "falls by 0.031 (> 0.03 allowed a set of 2 sequences)" in verdict["reason"]


def metrics_of(scores: dict[str, dict[str, float]]) -> dict:
    """A metrics.json of several roots with the given per-sequence J&F (one object each)."""
    return {
        "datasets": {
            root: {
                "J&F": float(np.mean(list(seqs.values()))),
                "J": 0.0,
                "F": 0.0,
                "Lost": None,
                "sequences": {name: {"J&F": v, "num_objects": 1} for name, v in seqs.items()},
            }
            for root, seqs in scores.items()
        }
    }


def test_summary_verdict_on_constructed_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = {"cvc_clinicdb": rng.uniform(0.5, 0.9, 6), "hc18_heldout": rng.uniform(0.5, 0.9, 8)}
    sets = [
        SuiteSet("cvc_val", tmp_path / "cvc_clinicdb", [f"s{i}" for i in range(6)], True),
        SuiteSet("hc18_heldout", tmp_path / "hc18_heldout", [f"s{i}" for i in range(8)], True),
    ]

    def metrics(shift: dict[str, float]) -> dict:
        return metrics_of({root: {f"s{i}": v + shift[root] for i, v in enumerate(vs)} for root, vs in base.items()})

    baseline = metrics({"cvc_clinicdb": 0.0, "hc18_heldout": 0.0})
    better = summarise(sets, {"candidate": metrics({"cvc_clinicdb": 0.05, "hc18_heldout": 0.03}), "baseline": baseline})
    assert better["medical_mean"]["difference"]["J&F"] == pytest.approx(0.04)
    assert better["verdict"]["ships"]
    assert better["sets"]["cvc_val"]["difference"]["interval"] == pytest.approx([0.05, 0.05])
    traded = summarise(sets, {"candidate": metrics({"cvc_clinicdb": 0.2, "hc18_heldout": -0.02}), "baseline": baseline})
    assert traded["medical_mean"]["difference"]["J&F"] == pytest.approx(0.09)
    assert not traded["verdict"]["ships"] and traded["verdict"]["falling_sets"] == ["hc18_heldout"]


# ------------------------------------------------------------------------------------------------------- stored video
@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    """A DAVIS root `tiny` with one 6-frame 63×47 sequence (odd sides) of a moving square, annotated."""
    root = tmp_path / "tiny"
    (root / "JPEGImages" / "clip").mkdir(parents=True)
    (root / "Annotations" / "clip").mkdir(parents=True)
    yy, xx = np.mgrid[:47, :63]
    for t in range(6):
        frame = np.stack([120 + 60 * np.sin(xx / 7 + t + c) * np.cos(yy / 9) for c in range(3)], -1).astype(np.uint8)
        labels = np.zeros((47, 63), np.uint8)
        labels[10 + t : 25 + t, 15 + 2 * t : 35 + 2 * t] = 1
        frame[labels == 1] = (200, 40, 40)
        Image.fromarray(frame).save(root / "JPEGImages" / "clip" / f"{t:05d}.jpg", quality=95)
        Image.fromarray(labels).save(root / "Annotations" / "clip" / f"{t:05d}.png")
    return root


@pytest.mark.parametrize("kind", sorted(STORAGE))
def test_stored_clip_keeps_size_count_and_annotations(tiny_root: Path, tmp_path: Path, kind: str) -> None:
    target = tmp_path / f"tiny@{kind}"
    meta = write_stored_set(tiny_root, ["clip"], kind, target)
    frames = sorted((target / "JPEGImages" / "clip").iterdir())
    assert [f.stem for f in frames] == [f"{t:05d}" for t in range(6)]
    assert {f.suffix for f in frames} == {".jpg" if kind == "jpeg30" else ".png"}
    originals = sorted((tiny_root / "JPEGImages" / "clip").iterdir())
    for frame, original in zip(frames, originals):
        with Image.open(frame) as image, Image.open(original) as source:
            assert image.size == (63, 47)
            assert image.mode == ("L" if kind == "grey" else "RGB")
            stored, reference = np.asarray(image, np.int16), np.asarray(source.convert("RGB"), np.int16)
            if kind == "grey":
                assert np.array_equal(stored, np.asarray(source.convert("L"), np.int16))
            else:  # lossy but the same picture: close to the original, not equal to it
                error = np.abs(stored - reference).mean()
                assert 0 < error < 25, error
    for t in range(6):
        name = f"{t:05d}.png"
        assert (target / "Annotations" / "clip" / name).read_bytes() == (
            tiny_root / "Annotations" / "clip" / name
        ).read_bytes()
    assert json.loads((target / "meta.json").read_text()) == meta
    assert meta["storage"] == kind and meta["mean_abs_difference"]["clip"] >= 0


def test_missing_data_is_skipped_with_a_reason(tiny_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tiny_root.rename(data / "vocalfolds")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"vocalfolds/clip": "val"}))
    sets, skipped = prepare_sets(
        ["vocalfolds_val", "hc18_heldout", "cvc_val", "cvc_val@grey", "vocalfolds_val@jpeg30"],
        data,
        tmp_path / "cache",
        split,
    )
    assert [s.name for s in sets] == ["vocalfolds_val", "vocalfolds_val@jpeg30"]
    assert set(skipped) == {"hc18_heldout", "cvc_val", "cvc_val@grey"}
    assert "hc18" in skipped["hc18_heldout"] and "cvc_val" in skipped["cvc_val@grey"]
    stored = sets[1].root
    again, _ = prepare_sets(["vocalfolds_val", "vocalfolds_val@jpeg30"], data, tmp_path / "cache", split)
    assert again[1].root == stored  # made once, then reused from the cache


# ------------------------------------------------------------------------------------------------------------ command
@pytest.mark.parametrize(
    "args, message",
    [
        (["--sets", "cvc_val,foo"], "foo: sets are"),
        (["--ckpt_path", "missing.pt"], "--ckpt_path missing.pt: no such file"),
        (["--eval_args", "--adapt_stepz 5"], "--adapt_stepz: not an evaluation flag"),
        (["--eval_args", "--split train"], "--split is set by the suite"),
        (["--resamples", "0"], "a positive integer"),
        (["--baseline_eval_args", "--size 256"], "only with --compare"),
    ],
)
def test_bad_flags_end_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--output_dir", str(tmp_path / "out"), "--data_root", str(tmp_path), *args])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_stored_sets_bring_their_lossless_set(tmp_path: Path) -> None:
    args = parse_args(
        ["--output_dir", str(tmp_path), "--data_root", str(tmp_path), "--sets", "cvc_val@avi,davis_val"]
        + ["--eval_args", "--size 256"]
    )
    assert args.sets == ["cvc_val", "davis_val", "cvc_val@avi"]
    assert args.eval_args == args.baseline_eval_args == ["--size", "256"]


@pytest.mark.slow
def test_one_set_suite_on_the_sample_clip(tmp_path: Path) -> None:
    """The whole command on the embedded vocalfolds clip: the suite's numbers are the evaluation's, the same weights
    compared with themselves differ by zero and do not ship, a failed evaluation leaves nothing, and an existing
    result is not overwritten."""
    common = ["--data_root", str(REPO / "bundle" / "sample"), "--sets", "vocalfolds_val"]
    common += ["--cache_dir", str(tmp_path / "cache"), "--ckpt_path", str(WEIGHTS)]
    failed = tmp_path / "failed"
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--output_dir", str(failed), "--eval_args", "--size 0"])
    assert str(exit_info.value.code).startswith("error: evaluation of") and "--size 0" in str(exit_info.value.code)
    assert not failed.exists()

    out = tmp_path / "suite"
    report = main([*common, "--output_dir", str(out), "--compare", str(WEIGHTS)])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    entry = report["sets"]["vocalfolds_val"]
    assert entry["num_sequences"] == 1 and entry["candidate"]["J&F"] == pytest.approx(metrics["J&F"])
    assert entry["candidate"]["interval"] == pytest.approx([metrics["J&F"]] * 2)  # one sequence: no spread
    assert entry["candidate"]["J&F"] > 0.5
    assert entry["difference"] == {"J&F": 0.0, "interval": [0.0, 0.0]}
    assert report["verdict"]["ships"] is False
    assert json.loads((out / "suite.json").read_text()) == json.loads(json.dumps(report))
    assert "| vocalfolds_val | 1 |" in (out / "suite.md").read_text()
    assert json.loads((out / "suite_split.json").read_text()) == {"vocalfolds/patient2_seq7": "val"}

    before = (out / "suite.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--output_dir", str(out)])
    assert "already holds results" in str(exit_info.value.code)
    assert (out / "suite.json").read_bytes() == before

    # an earlier suite of the baseline serves as --compare without evaluating it again: same differences (zero)
    reused = tmp_path / "reused"
    again = main([*common, "--output_dir", str(reused), "--compare", str(out)])
    assert again["sets"]["vocalfolds_val"]["difference"] == entry["difference"]
    assert again["baseline"]["from"] == str(out) and not (reused / "eval_baseline").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--output_dir", str(tmp_path / "x"), "--compare", str(out), "--eval_args", "--size 256"])
    assert "it was scored with" in str(exit_info.value.code)
