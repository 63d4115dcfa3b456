"""The propagation benchmark runs and reports what its table promises (its numbers are not checked: speed lives in
benchmarks, not tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.synthetic import SyntheticEchoSource
from scripts.tools import benchmark, benchmark_tables


def test_annotation_has_the_requested_objects() -> None:
    labels = SyntheticEchoSource(1, 64, 64, seed=1).labels(0)
    for objects in (1, 2, 3):
        out = benchmark.annotation(labels, objects)
        assert set(np.unique(out)) == set(range(objects + 1))
    three = benchmark.annotation(labels, 3)
    assert np.array_equal(three > 0, labels > 0)  # the third object is cut from the myocardium, nothing added


def test_one_configuration_measures_every_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test process's thread count alone
    args = benchmark.parse_args(["--frames", "12", "--warmup", "1", "--mem-every", "2", "--mem-size", "2"])
    cfg = {
        "variant": "lite",
        "runtime": "torch",
        "size": [64, 48],
        "objects": 3,
        "memory": "full",
        "frames": 12,
        "threads": 1,
        "device": "cpu",
        "mem_every": 2,
        "mem_size": 2,
        "top_k": 30,
        "infer_size": None,
        "checkpoint": "random",
        "warmup": 1,
        "seed": 0,
        "profile": True,
    }
    assert args.objects == [1, 3] and args.memory == ["one", "full"]
    full = benchmark.measure(cfg)
    one = benchmark.measure({**cfg, "memory": "one"})
    # timing starts after the annotated frame, the warm-up and (full) the 2 × 2 frames that fill the memory
    assert full["timed_frames"] == 12 - 1 - 1 - 4 and one["timed_frames"] == 12 - 1 - 1
    assert full["profile_calls"]["memory read"] == full["timed_frames"]
    assert set(full["profile_ms_per_frame"]) == {*benchmark.STAGES, "other"}
    ratios = benchmark_tables.full_to_one([full, one])
    assert list(ratios.values()) == [pytest.approx(full["ms_per_frame"] / one["ms_per_frame"])]
    table = benchmark_tables.markdown_table(json.loads(json.dumps([one, full])))
    assert table.count("\n") == 3 and "| lite | torch | 64×48 | 3 | full |" in table
    engine = benchmark.measure({**cfg, "runtime": "onnxruntime", "objects": 1})
    assert engine["profile_calls"]["key encoding"] == engine["timed_frames"]


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    bad = (["--objects", "4"], ["--memory", "half"], ["--frames", "20", "--mem-size", "8"], ["--runtimes", "tvm"])
    for argv in bad:
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
        assert "error:" in capsys.readouterr().err


def test_table_of_a_saved_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = {
        "variant": "lite",
        "runtime": "torch",
        "size": [384, 288],
        "infer_size": None,
        "objects": 1,
        "memory": "one",
        "frames": 300,
        "fps": 25.0,
        "ms_per_frame": 40.0,
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps([row, {**row, "memory": "full", "fps": 20.0, "ms_per_frame": 50.0}]))
    benchmark.main(["--table", str(path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith("| 1.25 |") and "| 20.0 | 50.0 |" in lines[-1]
