"""The prepared GPU lease (`scripts/tools/gpu_session_generalize.sh`) returns what matters even when cut.

A lease returns at most 8 files from $OUT (16 MiB each, 64 MiB together) and a command cut at its limit returns only
what is already there, so the weights must be written before any evaluation, and the file count must stay small.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from scripts.network import TCMN, load_network_weights

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bundle" / "scripts" / "tools" / "gpu_session_generalize.sh"
WEIGHTS = ["lite_static_ema_fp16.pt", "lite_static_raw_fp16.pt", "lite_video_ema_fp16.pt", "lite_video_raw_fp16.pt"]


def _body() -> list[str]:
    """The script's lines without comments, so the header cannot satisfy a check the code fails."""
    return [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]


def test_weights_saved_before_any_evaluation():
    """Every training saves its weights as it ends (inside train()), and evaluation runs only after the trainings."""
    lines = _body()
    train_def = next(i for i, line in enumerate(lines) if line.startswith("train() {"))
    train_end = next(i for i in range(train_def, len(lines)) if lines[i] == "}")
    save_call = next(
        i for i in range(train_def, train_end) if re.match(r'\s*\[ \$rc -eq 0 \] && save "\$name"', lines[i])
    )
    assert any("archive" in lines[i] for i in range(save_call, train_end)), "logs are archived after each training"
    calls = [i for i, line in enumerate(lines) if re.match(r"\s*(&& )?train lite_\w+ ", line)]
    evals = [i for i, line in enumerate(lines) if re.match(r"evaluate \w+ |for f in .*evaluate ", line)]
    assert len(calls) == 2 and evals, "two trainings, then the evaluations"
    assert max(calls) < min(evals)
    evaluating = [i for i, line in enumerate(lines) if "run evaluating" in line or "scripts.tools.suite" in line]
    evaluate_def = next(i for i, line in enumerate(lines) if line.startswith("evaluate() {"))
    assert evaluating and all(evaluate_def < i < min(evals) for i in evaluating), "evaluation only inside evaluate()"


def test_names_at_most_eight_outputs():
    """The files left under $OUT (weight names expanded), plus the one *.part a write has open at a time, are <= 8."""
    text = "\n".join(_body())
    literal = set(re.findall(r'\$OUT/([A-Za-z0-9_.-]+)"', text)) | set(re.findall(r'\$OUT/"\*?([A-Za-z0-9_.-]*)', text))
    literal.discard("")  # the glob "$OUT"/*_fp16.pt reads, it writes nothing
    stages = re.findall(r"train (lite_\w+) ", text)
    assert "{out}/{name}_{kind}_fp16.pt" in text and '("ema",' in text and '("raw",' in text
    weights = {f"{s}_{k}_fp16.pt" for s in stages for k in ("ema", "raw")}
    assert weights == set(WEIGHTS)
    kept = {name for name in literal if not name.endswith(".part")} | weights | {"results.json"}
    assert len(kept) + 1 <= 8, sorted(kept)


def _tiny_copy(shared: Path, root: Path) -> Path:
    """Links to a few frames and stills of each set (6 frames of two sequences, 8 stills), for pack_data."""
    pick = {"cvc_clinicdb": ("cvc00", "cvc01"), "vocalfolds": ("patient1_seq1", "patient1_seq3"),
            "davis2016": ("bear", "blackswan")}  # fmt: skip
    for name, seqs in pick.items():
        for seq in seqs:
            for kind in ("JPEGImages", "Annotations"):
                (root / name / kind / seq).mkdir(parents=True)
                for f in sorted((shared / name / kind / seq).iterdir())[:6]:
                    (root / name / kind / seq / f.name).symlink_to(f)
    for name in ("kvasir_seg", "hc18"):
        for kind in ("images", "masks"):
            (root / name / kind).mkdir(parents=True)
        for f in sorted((shared / name / "images").iterdir())[:8]:
            mask = shared / name / "masks" / f"{f.stem}.png"
            (root / name / "images" / f.name).symlink_to(f)
            (root / name / "masks" / mask.name).symlink_to(mask)
    return root


@pytest.mark.slow
def test_dry_run_on_cpu(shared_data: Path, tmp_path: Path):
    """The whole script on a CPU with tiny budgets: both trainings, weights, logs and results within the file limits."""
    source, packed, out = _tiny_copy(shared_data, tmp_path / "source"), tmp_path / "packed", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle"), "OMP_NUM_THREADS": "1"}
    for name in ("cvc_clinicdb", "vocalfolds", "davis2016", "kvasir_seg", "hc18"):
        subprocess.run(["python", "-m", "scripts.tools.pack_data", str(source / name), str(packed / name),
                        "--short-side", "64", "--quality", "60"], check=True, env=env, capture_output=True)  # fmt: skip
    run_env = {**env, "OUT": str(out), "STATIC": "5", "VIDEO": "5", "BATCH": "2", "WORKERS": "0",
               "DEADLINE": "400", "DATA_DIR": str(packed)}  # fmt: skip
    result = subprocess.run(["bash", str(SCRIPT)], env=run_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    files = {p.name: p.stat() for p in out.iterdir()}
    assert set(files) == {*WEIGHTS, "logs.tar.gz", "results.json"}
    assert len(files) <= 8 and sum(s.st_size for s in files.values()) < 64 * 2**20
    assert all(s.st_size < 16 * 2**20 for s in files.values())
    assert max(files[w].st_mtime for w in WEIGHTS) <= files["results.json"].st_mtime
    for w in WEIGHTS:  # fp16 state dicts that the bundle's own loader takes
        assert all(v.dtype != torch.float32 for v in torch.load(out / w, map_location="cpu").values())
        load_network_weights(TCMN("lite", pretrained=False), out / w)
    assert "shipped" in (out / "results.json").read_text()
    assert "error" in subprocess.run(["bash", str(SCRIPT)], env=run_env, capture_output=True, text=True).stderr
