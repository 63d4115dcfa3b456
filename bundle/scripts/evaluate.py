"""Semi-supervised VOS evaluation over DAVIS-layout roots: give a propagator each sequence's first annotation, score
every later frame against the ground truth, and write metrics, predictions, a CSV and a plot.

The model and the baselines share the ``propagate`` interface, so one code path scores them all. Scores follow
``scripts.metrics`` (dataset scores are means over objects; undefined HD95 is ``null``). Each object starts on the
first frame that annotates it, as in DAVIS 2017 and in slice stacks whose lesion appears a few slices in: objects
first annotated on the same frame are propagated together from it, objects starting later in a pass of their own
(the propagators take annotations that replace a whole frame, so a later object cannot join a running pass without
handing the method the truth of the others on that frame), and an object is scored on the frames after its start.
A sequence that cannot be scored (no frame annotates anything, unreadable frames, label maps of the wrong size) is
reported in ``metrics.json`` (``failed``) and on the console while the others are scored.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from scripts.annotations import read_label_series
from scripts.baselines import CopyFirstFrame, FarnebackFlow
from scripts.davis import Sequence, list_sequences
from scripts.distributed import gather, job_lock, rank_and_size, share
from scripts.errors import InputError
from scripts.flags import as_bool
from scripts.metrics import SCORES, SequenceScorer, aggregate, objects_of
from scripts.outputs import write_png_labels
from scripts.readers import open_video
from scripts.staging import prepare_output_dir, staged_output

METHODS = ("model", "copy", "flow")
OUTPUTS = ("metrics.json", "per_sequence.csv", "jf.png", "pred")  # all an evaluation writes into its output folder


def make_propagator(method: str, model_propagator=None):
    """The propagator a config names: ``model`` (the one the config builds), ``copy`` or ``flow``."""
    if method == "model":
        if model_propagator is None:
            raise ValueError("method 'model' needs the model's propagator (model_propagator)")
        return model_propagator
    if method == "copy":
        return CopyFirstFrame()
    if method == "flow":
        return FarnebackFlow()
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


class Evaluation:
    """One evaluation run; plain constructor arguments so a bundle config can declare it.

    ``dataset_dir`` may list several roots separated by commas; ``split`` keeps only that split's sequences of
    ``split_file`` (see ``scripts.davis.list_sequences``); ``sequences`` keeps only the named ones (``name`` or
    ``dataset/name``).
    """

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        propagator,
        overwrite: bool | str = False,
        split: str | None = None,
        split_file: str | None = None,
        sequences: list[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.roots = [Path(r.strip()) for r in str(dataset_dir).split(",") if r.strip()]
        names = [r.name for r in self.roots]
        if not names or len(set(names)) != len(names):
            raise InputError(f"{dataset_dir!r}: give one or more dataset roots with distinct folder names")
        self.output_dir = Path(output_dir)
        self.propagator = propagator
        self.overwrite = as_bool(overwrite)
        self.split = split
        self.split_file = split_file
        self.sequences = sequences
        self.progress = progress

    def run(self) -> dict:
        """Evaluate every selected sequence and write ``OUTPUTS``; nothing is written unless all succeed, and nothing
        else in the output folder is touched."""
        prepare_output_dir(self.output_dir, OUTPUTS, self.overwrite)  # refuse before any work is done
        selected = self.select()
        with staged_output(self.output_dir, OUTPUTS, self.overwrite) as staging:
            outcomes = self.score(selected, staging / "pred")
            report = self.write(staging, selected, outcomes)
        self.announce(report, selected, outcomes)
        return report

    def pred_dir(self, pred_root: Path, seq: Sequence) -> Path:
        """Where a sequence's predicted label maps go under ``pred_root`` (``dataset/name`` with several roots)."""
        return pred_root / (f"{seq.dataset}/{seq.name}" if len(self.roots) > 1 else seq.name)

    def score(self, sequences: list[Sequence], pred_root: Path) -> dict[str, dict | str]:
        """Each sequence's scores (its predictions written under ``pred_root``), or why it could not be scored."""
        pred_root.mkdir(parents=True, exist_ok=True)
        outcomes: dict[str, dict | str] = {}
        for seq in tqdm(sequences, desc="evaluate", unit="seq", disable=not self.progress):
            pred_dir = self.pred_dir(pred_root, seq)
            try:
                outcomes[seq.key] = self.evaluate_sequence(seq, pred_dir)
            except InputError as exc:  # one bad sequence is reported, the others are still scored
                shutil.rmtree(pred_dir, ignore_errors=True)
                outcomes[seq.key] = str(exc)
                print(f"warning: {seq.key}: not scored: {exc}", file=sys.stderr)
        return outcomes

    def write(self, staging: Path, selected: list[Sequence], outcomes: dict[str, dict | str]) -> dict:
        """Write the report files of ``outcomes`` (in ``selected`` order) into ``staging``, beside its ``pred``."""
        results, failed = _split(selected, outcomes)
        if not results:
            raise InputError(f"no sequence could be scored: {'; '.join(failed.values())}")
        report = self.report(results, failed)
        (staging / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
        _write_csv(staging / "per_sequence.csv", results)
        _plot(staging / "jf.png", results, report["J&F"], len(self.roots) > 1)
        return report

    def announce(self, report: dict, selected: list[Sequence], outcomes: dict[str, dict | str]) -> None:
        """The console's summary once the outputs are in place."""
        results, failed = _split(selected, outcomes)
        _print_table(report, results)
        if failed:
            print(f"not scored ({len(failed)}): " + "; ".join(f"{key}: {why}" for key, why in failed.items()))
        out = self.output_dir.absolute()
        print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)}/ (predicted label maps)")

    def select(self) -> list[Sequence]:
        """The sequences to evaluate, after split and name filtering."""
        found = list_sequences(self.roots, self.split, self.split_file)
        if not found:
            raise InputError(f"{', '.join(map(str, self.roots))}: no sequence in split {self.split!r}")
        if self.sequences is not None:
            wanted = set(self.sequences)
            missing = wanted - {s.name for s in found} - {s.key for s in found}
            if missing:
                raise InputError(
                    f"{', '.join(map(str, self.roots))}: no sequence {sorted(missing)} (split {self.split!r})"
                )
            found = [s for s in found if s.name in wanted or s.key in wanted]
        return found

    def evaluate_sequence(self, seq: Sequence, pred_dir: Path) -> dict:
        """Propagate each object from the first frame that annotates it, writing the merged predictions and scoring
        each object on the frames after its start."""
        with open_video(seq.frames[0].parent) as source:
            gts = read_label_series(seq.masks[0].parent)
            if gts.shape != (len(source), source.info.height, source.info.width):
                raise InputError(
                    f"{seq.masks[0].parent}: {'×'.join(map(str, gts.shape))} (T×H×W) label maps for "
                    f"{len(source)} frames of {source.info.height}×{source.info.width}"
                )
            starts = first_frames(gts)
            if not starts:
                raise InputError(f"{seq.masks[0].parent}: no frame annotates an object")
            scorer = SequenceScorer(starts, skip_frames=(), starts=starts)
            merged = np.zeros_like(gts)  # the passes' predictions, an earlier-starting object winning a pixel
            for start in sorted(set(starts.values())):
                objects = [k for k, f in starts.items() if f == start]
                annotation = np.where(np.isin(gts[start], objects), gts[start], 0).astype(np.uint8)
                seen = set()
                for t, labels in self.propagator.propagate(source, {start: annotation}):
                    if t in seen:
                        raise RuntimeError(f"{type(self.propagator).__name__} yielded frame {t} of {seq.key} twice")
                    seen.add(t)
                    scorer.append(t, labels, gts[t], objects)
                    if t >= start:  # before its first annotation an object is not known yet
                        mine = np.isin(labels, objects) & (merged[t] == 0)
                        merged[t][mine] = labels[mine]
                if len(seen) != len(source):
                    raise RuntimeError(
                        f"{type(self.propagator).__name__} yielded {len(seen)} of {len(source)} frames of {seq.key}"
                    )
        pred_dir.mkdir(parents=True)
        for t, labels in enumerate(merged):
            write_png_labels(pred_dir, t, labels)
        return {"num_frames": len(source), **scorer.aggregate()}

    def report(self, results: dict[str, dict[str, dict]], failed: dict[str, str] | None = None) -> dict:
        """The metrics.json content: dataset scores on top, per-dataset (if several), sequence and object below;
        ``failed`` names each sequence that could not be scored and why."""
        blocks = {name: {**aggregate(seqs), "sequences": seqs} for name, seqs in results.items()}
        everything = {f"{d}/{s}": r for d, seqs in results.items() for s, r in seqs.items()}
        top = {**aggregate(everything), "method": type(self.propagator).__name__, "dataset": ",".join(results)}
        top["failed"] = dict(failed or {})
        if len(self.roots) == 1:
            return {**top, "sequences": next(iter(blocks.values()))["sequences"]}
        return {**top, "datasets": blocks}


class DistributedEvaluation(Evaluation):
    """`Evaluation` with its sequences shared over the ranks; rank 0 writes the outputs of the whole set.

    Each rank propagates and scores its share (its predictions kept in a private temporary folder); the scores and
    predicted PNGs are gathered, and rank 0 writes them as one process would: the metrics are those of a
    single-process run, each sequence scored alone and the means taken in the same (selection) order. Works across
    nodes too (the predictions travel through the process group, not a shared folder). Every rank returns the
    report. Without a process group it is `Evaluation`.
    """

    def run(self) -> dict:
        rank, world_size = rank_and_size()
        if world_size == 1:
            return super().run()
        prepare_output_dir(self.output_dir, OUTPUTS, self.overwrite)  # every rank refuses alike, early
        with job_lock(self.output_dir):
            selected = self.select()
            scratch = Path(tempfile.mkdtemp(prefix=".tcmn-eval-"))
            try:
                mine = self.score(share(selected, rank, world_size), scratch)
                pngs = {
                    seq.key: {p.name: p.read_bytes() for p in sorted(self.pred_dir(scratch, seq).iterdir())}
                    for seq in selected
                    if isinstance(mine.get(seq.key), dict)
                }
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            outcomes, predictions = {}, {}
            for part, part_pngs in gather((mine, pngs)):
                outcomes.update(part)
                predictions.update(part_pngs)
            report = None
            if rank == 0:
                with staged_output(self.output_dir, OUTPUTS, self.overwrite) as staging:
                    (staging / "pred").mkdir()
                    for seq in selected:
                        if seq.key in predictions:
                            pred_dir = self.pred_dir(staging / "pred", seq)
                            pred_dir.mkdir(parents=True)
                            for name, data in predictions[seq.key].items():
                                (pred_dir / name).write_bytes(data)
                    report = self.write(staging, selected, outcomes)
                self.announce(report, selected, outcomes)
            return gather(report)[0]


def _split(selected: list[Sequence], outcomes: dict[str, dict | str]) -> tuple[dict[str, dict[str, dict]], dict]:
    """Scores by dataset and sequence, and the sequences not scored with why, both in ``selected`` order."""
    results: dict[str, dict[str, dict]] = defaultdict(dict)
    failed: dict[str, str] = {}
    for seq in selected:
        outcome = outcomes[seq.key]
        if isinstance(outcome, str):
            failed[seq.key] = outcome
        else:
            results[seq.dataset][seq.name] = outcome
    return results, failed


def first_frames(labels: np.ndarray) -> dict[int, int]:
    """Each object (label value) of ``T×H×W`` label maps → the first frame that shows it."""
    present = [objects_of(frame) for frame in labels]
    starts: dict[int, int] = {}
    for t, objects in enumerate(present):
        for k in objects:
            starts.setdefault(k, t)
    return starts


def _json_safe(value):
    """NaN (undefined HD95) as JSON null; JSON has no NaN."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _write_csv(path: Path, results: dict[str, dict[str, dict]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "sequence", "num_frames", "num_objects", *SCORES])
        for dataset, seqs in results.items():
            for name, r in seqs.items():
                values = ["" if math.isnan(r[k]) else f"{r[k]:.6f}" for k in SCORES]
                writer.writerow([dataset, name, r["num_frames"], r["num_objects"], *values])


def _plot(path: Path, results: dict[str, dict[str, dict]], mean: float, multi: bool) -> None:
    """J&F per sequence (bars) and over normalised time (one line per sequence, mean over objects)."""
    names, scores = [], []
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    bars, curves = fig.subplots(1, 2, width_ratios=[3, 2])
    for dataset, seqs in results.items():
        for name, r in seqs.items():
            names.append(f"{dataset}/{name}" if multi else name)
            scores.append(r["J&F"])
            per_frame = defaultdict(list)
            for obj in r["objects"].values():
                for f in obj["frames"]:
                    per_frame[f["frame"]].append(f["J&F"])
            t = np.array(sorted(per_frame))
            curves.plot(t / max(r["num_frames"] - 1, 1), [np.mean(per_frame[i]) for i in t], lw=1, alpha=0.7)
    bars.bar(range(len(names)), scores)
    bars.axhline(mean, color="k", ls="--", lw=1, label=f"mean over objects {mean:.3f}")
    bars.legend(loc="upper right")
    bars.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    bars.set(ylim=(0, 1), ylabel="J&F", title="J&F per sequence")
    curves.set(xlim=(0, 1), ylim=(0, 1), xlabel="normalised time in sequence", ylabel="J&F", title="J&F over time")
    fig.savefig(path, dpi=100)


def _print_table(report: dict, results: dict[str, dict[str, dict]]) -> None:
    rows = [(f"{d}/{s}", r) for d, seqs in results.items() for s, r in seqs.items()]
    if "datasets" in report:
        rows += [(f"{d} (mean over objects)", b) for d, b in report["datasets"].items()]
    rows.append(("mean over objects", report))
    width = max(len(name) for name, _ in rows)
    print(f"{report['method']} on {report['dataset']}")
    print(f"{'sequence':<{width}}  " + "  ".join(f"{k:>6}" for k in SCORES))
    for name, r in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{r[k]:6.3f}" for k in SCORES))
