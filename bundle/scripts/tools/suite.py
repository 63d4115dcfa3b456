"""The evaluation suite: one command scores weights on every yardstick the project has, with bootstrap intervals, and
with ``--compare`` decides whether a candidate ships.

Why a suite: the val splits hold 5 and 2 sequences, so differences of a few hundredths between runs are noise. The
suite adds DAVIS 2016 val (natural video), clips made from the held-out fifth of Kvasir-SEG and of HC18 (objects no
training stage saw), and the cvc and vocalfolds val clips stored as clinics store video (MPEG-4 part 2 AVI, low-bitrate
H.264 MP4, JPEG quality 30, greyscale), and says per set how sure each number is.

    python -m scripts.tools.suite --ckpt_path FILE [--compare BASELINE] --output_dir DIR [--sets cvc_val,…]
        [--data_root ../shared/data] [--cache_dir DIR] [--eval_args "--adapt_steps 5"] [--overwrite true]

Sets (``SETS``): ``cvc_val`` and ``vocalfolds_val`` (the ``val`` entries of ``--split_file``), ``davis_val`` (the
``val`` list of ``davis2016/meta.json``), ``kvasir_heldout`` and ``hc18_heldout`` (``scripts.tools.heldout_clips`` over the
held-out stills, with its defaults: 60 clips of 20 frames, 320², seed 0), and ``<cvc_val|vocalfolds_val>@<storage>``
for each storage of ``STORAGE``: every val sequence encoded with PyAV (the real codecs) and decoded back to PNG frames
(JPEG frames for ``jpeg30``, greyscale PNG for ``grey``), annotations copied. Generated sets are written once into
``--cache_dir`` under a digest of everything they depend on (sources, settings, format version), and reused.

Everything is scored by the bundle's own evaluation: one ``python -m monai.bundle run evaluating`` process per
weights file over all set roots, with a split file naming the suite's sequences (written to the output folder), so
``--eval_args`` pass through to it and are checked by it like any evaluation flag.

Statistics (all over *sequences*, the unit that varies between videos; frames of one video are not independent):

- A set's J&F is the evaluation's: the mean over all objects of its sequences. Its 95 % interval is the percentile
  bootstrap: ``--resamples`` resamples of the set's sequences with replacement, each giving the object-weighted mean
  of the drawn sequences; the interval is the 2.5th to 97.5th percentile of those means (numpy's linear
  interpolation). A set of one sequence has an interval of zero width: it says nothing about other videos.
- The medical mean is the plain mean of the set J&F of the medical sets evaluated (``MEDICAL``: cvc_val,
  vocalfolds_val, kvasir_heldout, hc18_heldout; each set counts once, whatever its size). Its interval resamples
  each set's sequences independently (a stratified bootstrap) and averages the sets' resampled means.
- With ``--compare``, a set's difference is candidate minus baseline on the same sequences; its interval is the paired
  bootstrap: the same drawn sequences for both weights, i.e. resampling the per-sequence differences.
- A stored set's drop is its lossless set's J&F minus its own (same sequences, so also a paired interval); the target
  is a drop under ``DROP_TARGET``.

The shipping rule (issue 20: "a candidate ships when the mean over the medical sets rises by more than its interval
and no set falls by more than its own"), read as: the candidate ships when the paired 95 % interval of the
difference of the medical mean lies wholly above zero (its lower end > 0: the rise is larger than its own
uncertainty), and no evaluated set (medical, DAVIS and stored alike) has a paired 95 % interval of its difference
wholly below zero (upper end < 0: a fall larger than its uncertainty). A set whose interval straddles zero neither
counts for nor against. The rule is fixed before the run; the output states each part.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from scripts.data import list_sequences, load_split
from scripts.errors import InputError
from scripts.flags import as_bool
from scripts.outputs import prepare_output_dir, staged_output
from scripts.static_clips import HELD_OUT_EVERY

BUNDLE = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE / "configs"
CACHE_VERSION = 1  # bump when a generated set's content changes for the same settings
LEVEL = 0.95
RESAMPLES = 2000
DROP_TARGET = 0.03  # issue 20: a stored set may lose at most this much J&F against the lossless frames


@dataclass(frozen=True)
class Storage:
    """How a stored-video set stores its frames: a video codec (encoded, then decoded to PNG) or an image format."""

    description: str
    codec: str | None = None  # PyAV encoder; None: frames stored as images
    container: str | None = None  # PyAV container format
    bits_per_pixel: float = 0.0  # bit rate as bits per pixel per frame (the codec's rate control target)
    jpeg_quality: int | None = None
    grey: bool = False


FPS = 25  # the frame rate the videos are encoded at: with the bit rate, it sets the bits each frame gets
STORAGE = {
    # 0.35 bit per pixel per frame: about what OpenCV's VideoWriter ('XVID', 'mp4v') writes (model card, Suite)
    "avi": Storage("MPEG-4 part 2 (mpeg4) in AVI, 0.35 bit/pixel/frame, GOP 12", "mpeg4", "avi", 0.35),
    # 0.1 bit per pixel per frame: 276 kbit/s at 384×288 and 655 kbit/s at 512×512, 25 frames/s (a low rate)
    "h264": Storage("H.264 (libx264) in MP4 at low bit rate, 0.1 bit/pixel/frame", "libx264", "mp4", 0.1),
    "jpeg30": Storage("JPEG series, quality 30 (4:2:0)", jpeg_quality=30),
    "grey": Storage("greyscale PNG series (ITU-R 601 luma)", grey=True),
}
HELDOUT_SETTINGS = {"clips": 60, "frames": 20, "size": 320, "max_objects": 2, "seed": 0}  # heldout_clips' defaults
VAL_SETS = {"cvc_val": "cvc_clinicdb", "vocalfolds_val": "vocalfolds"}  # set → data folder (val of --split_file)
DAVIS_SETS = {"davis_val": "davis2016"}  # val list of the folder's meta.json
HELDOUT_SETS = {"kvasir_heldout": "kvasir_seg", "hc18_heldout": "hc18"}  # image/mask folders
STORED_SETS = {f"{base}@{kind}": (base, kind) for base in VAL_SETS for kind in STORAGE}
SETS = (*VAL_SETS, *DAVIS_SETS, *HELDOUT_SETS, *STORED_SETS)
MEDICAL = ("cvc_val", "vocalfolds_val", "kvasir_heldout", "hc18_heldout")
SUITE_FLAGS = ("dataset_dir", "output_dir", "split", "split_file", "ckpt_path", "overwrite", "method")
# the evaluation job's config: evaluate.json is a layer over inference.json
EVALUATE_CONFIGS = [str(CONFIGS / name) for name in ("inference.json", "evaluate.json")]
OUTPUTS = ("suite.json", "suite.md", "suite_split.json", "eval", "eval.log")
BASELINE_OUTPUTS = ("eval_baseline", "eval_baseline.log")


# ---------------------------------------------------------------------------------------------------------- statistics
def bootstrap_means(values: np.ndarray, weights: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted means of ``values`` over ``resamples`` resamples (with replacement) of its entries: one per resample."""
    values, weights = np.asarray(values, float), np.asarray(weights, float)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return (values[picks] * weights[picks]).sum(1) / weights[picks].sum(1)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding ``level`` of ``samples``."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float(np.dot(values, weights) / np.sum(weights))


def estimate(
    groups: Sequence[tuple[np.ndarray, np.ndarray]], resamples: int, seed: int | Sequence[int], level: float = LEVEL
) -> dict:
    """The mean over ``groups`` of each group's weighted mean, with its stratified percentile-bootstrap interval
    (each group's entries resampled on their own). One group: a set's J&F over its sequences weighted by objects."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([weighted_mean(v, w) for v, w in groups]))
    samples = np.mean([bootstrap_means(v, w, resamples, rng) for v, w in groups], axis=0)
    low, high = interval(samples, level)
    return {"J&F": point, "interval": [low, high]}


def shipping_verdict(differences: Mapping[str, Mapping], medical: Mapping) -> dict:
    """The shipping rule (module docstring) on paired differences ``{"J&F": d, "interval": [low, high]}``."""
    rises = medical["interval"][0] > 0
    falling = sorted(name for name, d in differences.items() if d["interval"][1] < 0)
    if rises and not falling:
        reason = "the medical mean rises beyond its interval and no set falls beyond its own"
    else:
        parts = [] if rises else [f"the medical mean's interval {_show_interval(medical['interval'])} is not above 0"]
        parts += [
            f"{name} falls beyond its interval {_show_interval(differences[name]['interval'])}" for name in falling
        ]
        reason = "; ".join(parts)
    return {"ships": rises and not falling, "medical_rises": rises, "falling_sets": falling, "reason": reason}


# ------------------------------------------------------------------------------------------------------- stored video
def encode_decode(frames: Sequence[np.ndarray], storage: Storage) -> list[np.ndarray]:
    """Store RGB frames (H×W×3 uint8) with a real video codec in memory and decode them back.

    Odd sides are padded by repeating the edge for 4:2:0 chroma, and cropped back after decoding.
    """
    height, width = frames[0].shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=storage.container) as container:
        stream = container.add_stream(storage.codec, rate=FPS)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = max(1, round(storage.bits_per_pixel * stream.width * stream.height * FPS))
        if storage.codec == "mpeg4":
            stream.codec_context.gop_size = 12  # OpenCV's and FFmpeg's default for MPEG-4 part 2
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.pad(frame, pad, mode="edge")), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer, "r") as container:
        decoded = [f.to_ndarray(format="rgb24")[:height, :width] for f in container.decode(video=0)]
    if len(decoded) != len(frames):
        raise RuntimeError(f"{storage.codec}: {len(frames)} frames encoded, {len(decoded)} decoded")
    return decoded


def write_stored_set(source_root: Path, names: Sequence[str], kind: str, target: Path, overwrite: bool = False) -> dict:
    """Write sequences ``names`` of the DAVIS root ``source_root`` stored as ``STORAGE[kind]`` into ``target`` (DAVIS
    layout, annotations copied, a ``meta.json``); nothing is written unless all of it is. Returns the meta data,
    which records how far the stored frames are from the originals (mean absolute difference in grey levels)."""
    storage = STORAGE[kind]
    sequences = {s.name: s for s in list_sequences(source_root)}
    differences = {}
    with staged_output(target, ("JPEGImages", "Annotations", "meta.json"), overwrite) as staging:
        for name in names:
            seq = sequences[name]
            frames = [_read_rgb(path) for path in seq.frames]
            if storage.codec:
                stored = encode_decode(frames, storage)
                images = [Image.fromarray(f) for f in stored]
                suffix, options = ".png", {}
            elif storage.grey:
                images = [Image.fromarray(f).convert("L") for f in frames]
                suffix, options = ".png", {}
            else:
                images = [Image.fromarray(f) for f in frames]
                suffix, options = ".jpg", {"quality": storage.jpeg_quality}
            (staging / "JPEGImages" / name).mkdir(parents=True)
            (staging / "Annotations" / name).mkdir(parents=True)
            errors = []
            for frame, image, source_path, mask in zip(frames, images, seq.frames, seq.masks):
                path = staging / "JPEGImages" / name / f"{source_path.stem}{suffix}"
                image.save(path, **options)
                errors.append(float(np.abs(_read_rgb(path).astype(np.int16) - frame).mean()))
                shutil.copyfile(mask, staging / "Annotations" / name / mask.name)
            differences[name] = float(np.mean(errors))
        meta = {
            "dataset": target.name,
            "source": str(source_root),
            "storage": kind,
            "description": storage.description,
            "frames_per_second": FPS if storage.codec else None,
            "mean_abs_difference": differences,  # per sequence, grey levels (0-255) over pixels and channels
            "classes": _classes(source_root),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _classes(root: Path) -> dict:
    try:
        return json.loads((root / "meta.json").read_text()).get("classes", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


# --------------------------------------------------------------------------------------------------------------- sets
@dataclass
class SuiteSet:
    """One set ready to evaluate: its DAVIS root and the sequences of that root it scores."""

    name: str
    root: Path
    sequences: list[str]
    medical: bool
    lossless: str | None = None  # for a stored set: the set it is the stored copy of


def _digest(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _cached(cache_dir: Path, name: str, settings: Mapping) -> tuple[Path, bool]:
    """The cache folder of a generated set (under a digest of its settings) and whether it is complete.
    ``meta.json`` moves in last (``staged_output`` moves in the order named), so it marks a complete copy."""
    target = cache_dir / _digest({**settings, "set": name, "version": CACHE_VERSION}) / name
    return target, (target / "meta.json").is_file()


def val_sequences(root: Path, split_file: Path) -> list[str]:
    return [s.name for s in list_sequences(root, "val", split_file)]


def davis_val_sequences(root: Path) -> list[str]:
    """DAVIS 2016 val from the folder's own ``meta.json`` (``splits.val``), whatever the split file says."""
    try:
        names = json.loads((root / "meta.json").read_text())["splits"]["val"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{root / 'meta.json'}: no list of val sequences under 'splits' ({err})") from err
    present = {s.name for s in list_sequences(root)}
    missing = [n for n in names if n not in present]
    if missing:
        raise InputError(f"{root}: val sequences {missing} of its meta.json are missing")
    return list(names)


def prepare_sets(names: Sequence[str], data_root: Path, cache_dir: Path, split_file: Path) -> tuple[list, dict]:
    """The sets to evaluate (generated ones made or found in the cache) and the reasons others were skipped."""
    ready: dict[str, SuiteSet] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name in VAL_SETS or name in DAVIS_SETS:
            root = data_root / {**VAL_SETS, **DAVIS_SETS}[name]
            if not (root / "JPEGImages").is_dir():
                skipped[name] = f"{root}: no DAVIS-layout data there"
                continue
            sequences = val_sequences(root, split_file) if name in VAL_SETS else davis_val_sequences(root)
            if not sequences:
                skipped[name] = f"{root}: no val sequence in {split_file}"
                continue
            ready[name] = SuiteSet(name, root, sequences, name in MEDICAL)
        elif name in HELDOUT_SETS:
            source = data_root / HELDOUT_SETS[name]
            if not (source / "images").is_dir():
                skipped[name] = f"{source}: no image/mask folder there"
                continue
            from scripts.tools.heldout_clips import write_heldout_clips  # MONAI transforms: only when needed

            stills = sorted(p.name for p in (source / "images").iterdir())
            settings = {"source": str(source.resolve()), "stills": stills, **HELDOUT_SETTINGS}
            target, complete = _cached(cache_dir, name, settings)
            if not complete:
                print(f"{name}: writing {HELDOUT_SETTINGS['clips']} clips from the held-out fifth of {source}")
                write_heldout_clips(str(source), target, **HELDOUT_SETTINGS, overwrite=True)
            clips = [s.name for s in list_sequences(target)]
            ready[name] = SuiteSet(name, target, clips, True)
        else:
            base, kind = STORED_SETS[name]
            if base not in ready:
                skipped[name] = f"its lossless set {base} is skipped"
                continue
            lossless = ready[base]
            frames = {
                n: sorted(p.name for p in (lossless.root / "JPEGImages" / n).iterdir()) for n in lossless.sequences
            }
            settings = {"source": str(lossless.root.resolve()), "frames": frames, "storage": STORAGE[kind].__dict__}
            target, complete = _cached(cache_dir, name, {**settings, "fps": FPS})
            if not complete:
                print(f"{name}: storing {len(lossless.sequences)} sequences of {lossless.root} as {kind}")
                write_stored_set(lossless.root, lossless.sequences, kind, target, overwrite=True)
            ready[name] = SuiteSet(name, target, list(lossless.sequences), False, base)
    return list(ready.values()), skipped


def suite_split(sets: Sequence[SuiteSet]) -> dict[str, str]:
    """A split file in which exactly the suite's sequences are ``val`` (every other sequence of its roots ``train``)."""
    split = {}
    for s in sets:
        for seq in list_sequences(s.root):
            split[f"{s.root.name}/{seq.name}"] = "val" if seq.name in s.sequences else "train"
    return split


# --------------------------------------------------------------------------------------------------------- evaluation
def run_evaluation(
    ckpt: Path, sets: Sequence[SuiteSet], split_file: Path, output: Path, log: Path, eval_args: Sequence[str]
) -> dict:
    """Score ``ckpt`` on all sets in one ``evaluating`` process; returns its metrics.json. Its progress shows on
    stderr; its full output goes to ``log``. A failed evaluation raises an ``InputError`` with its last line."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "evaluating",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        repr(EVALUATE_CONFIGS),
        "--dataset_dir",
        ",".join(str(s.root.absolute()) for s in sets),
        "--output_dir",
        str(output.absolute()),
        "--split",
        "val",
        "--split_file",
        str(split_file.absolute()),
        "--ckpt_path",
        str(ckpt.absolute()),
        *eval_args,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BUNDLE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env["PYTHONWARNINGS"] = "ignore:parsing config_file:UserWarning:monai.bundle.scripts"
    print(f"evaluating {ckpt} on {len(sets)} sets (log: {log.name})", flush=True)
    tail = b""
    with log.open("wb") as out:
        out.write((shlex.join(command) + "\n").encode())
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, env=env)
        while chunk := process.stderr.read1(4096):  # progress bars through to the user, everything into the log
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            out.write(chunk)
            tail = (tail + chunk)[-8192:]
        code = process.wait()
    if code != 0:
        lines = [line.strip() for line in tail.decode(errors="replace").replace("\r", "\n").splitlines()]
        errors = [line for line in lines if line.startswith("error:")]
        last = errors[-1][len("error:") :].strip() if errors else next((x for x in reversed(lines) if x), "")
        raise InputError(f"evaluation of {ckpt} failed (exit {code}): {last}")
    return json.loads((output / "metrics.json").read_text())


def per_sequence(metrics: Mapping, s: SuiteSet) -> tuple[np.ndarray, np.ndarray, dict]:
    """One set's per-sequence J&F and object counts (in ``s.sequences`` order) and its dataset scores."""
    block = metrics["datasets"][s.root.name] if "datasets" in metrics else metrics
    seqs = block["sequences"]
    values = np.array([seqs[n]["J&F"] for n in s.sequences], float)
    weights = np.array([seqs[n]["num_objects"] for n in s.sequences], float)
    return values, weights, block


def summarise(
    sets: Sequence[SuiteSet],
    metrics: Mapping[str, Mapping],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """Everything the suite reports, from each side's metrics.json (``candidate``, optionally ``baseline``)."""
    sides = list(metrics)
    scores = {side: {s.name: per_sequence(metrics[side], s) for s in sets} for side in sides}
    report: dict = {"sets": {}}
    for k, s in enumerate(sets):
        entry: dict = {
            "dataset": s.root.name,
            "root": str(s.root),
            "medical": s.medical,
            "lossless": s.lossless,
            "num_sequences": len(s.sequences),
        }
        for side in sides:
            values, weights, block = scores[side][s.name]
            result = estimate([(values, weights)], resamples, [seed, k], level)
            entry["num_objects"] = int(weights.sum())
            entry[side] = {**result, **{m: block[m] for m in ("J", "F", "Lost")}}
            entry[side]["sequences"] = dict(zip(s.sequences, values.tolist()))
            if s.lossless is not None and s.lossless in scores[side]:
                base_values, base_weights, _ = scores[side][s.lossless]
                drop = estimate([(base_values - values, weights)], resamples, [seed, k, 1], level)
                entry[side]["drop"] = {**drop, "meets_target": drop["J&F"] < DROP_TARGET}
        if len(sides) == 2:
            (cv, w, _), (bv, _, _) = scores["candidate"][s.name], scores["baseline"][s.name]
            entry["difference"] = estimate([(cv - bv, w)], resamples, [seed, k, 2], level)
        report["sets"][s.name] = entry
    medical = [s for s in sets if s.medical]
    if medical:
        block: dict = {"sets": [s.name for s in medical]}
        for side in sides:
            block[side] = estimate([scores[side][s.name][:2] for s in medical], resamples, [seed, 1000], level)
        if len(sides) == 2:
            paired = [
                (scores["candidate"][s.name][0] - scores["baseline"][s.name][0], scores["candidate"][s.name][1])
                for s in medical
            ]
            block["difference"] = estimate(paired, resamples, [seed, 1001], level)
        report["medical_mean"] = block
    if len(sides) == 2:
        differences = {name: entry["difference"] for name, entry in report["sets"].items()}
        if medical:
            report["verdict"] = shipping_verdict(differences, report["medical_mean"]["difference"])
        else:
            report["verdict"] = {"ships": False, "reason": "no medical set was evaluated"}
    return report


# ---------------------------------------------------------------------------------------------------------- reporting
def _show_interval(bounds: Sequence[float]) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _score(value: float | None) -> str:
    """A score, or a dash where it is undefined (Lost of objects no scored frame shows: null in metrics.json)."""
    return "–" if value is None else f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def markdown(report: Mapping) -> str:
    """The suite's table: per set J&F with its interval and Lost, the comparison and the storage drops."""
    compare = "baseline" in next(iter(report["sets"].values()), {})
    head = ["set", "seqs", "J&F [95 % CI]", "Lost"]
    if compare:
        head += ["baseline J&F [95 % CI]", "baseline Lost", "Δ J&F [paired 95 % CI]"]
    head += ["drop from lossless [95 % CI]"]
    rows = [head, ["---"] * len(head)]
    for name, e in report["sets"].items():
        c = e["candidate"]
        row = [name, str(e["num_sequences"]), f"{c['J&F']:.3f} {_show_interval(c['interval'])}", _score(c["Lost"])]
        if compare:
            b, d = e["baseline"], e["difference"]
            row += [f"{b['J&F']:.3f} {_show_interval(b['interval'])}", _score(b["Lost"])]
            row += [f"{_signed(d['J&F'])} {_show_interval(d['interval'])}"]
        drop = c.get("drop")
        row += [f"{drop['J&F']:.3f} {_show_interval(drop['interval'])}" if drop else ""]
        rows.append(row)
    if "medical_mean" in report:
        m = report["medical_mean"]
        row = ["**medical mean**", "", f"{m['candidate']['J&F']:.3f} {_show_interval(m['candidate']['interval'])}", ""]
        if compare:
            row += [f"{m['baseline']['J&F']:.3f} {_show_interval(m['baseline']['interval'])}", ""]
            row += [f"{_signed(m['difference']['J&F'])} {_show_interval(m['difference']['interval'])}"]
        rows.append(row + [""])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    if "medical_mean" in report:
        lines += ["", f"Medical mean over: {', '.join(report['medical_mean']['sets'])}."]
    stored = {n: e["candidate"]["drop"] for n, e in report["sets"].items() if "drop" in e["candidate"]}
    if stored:
        over = [n for n, d in stored.items() if not d["meets_target"]]
        lines.append(
            f"Storage drops under {DROP_TARGET}: {len(stored) - len(over)} of {len(stored)}"
            + (f" (not: {', '.join(over)})." if over else ".")
        )
    if "verdict" in report:
        v = report["verdict"]
        lines.append(f"Verdict: {'SHIPS' if v['ships'] else 'does not ship'}: {v['reason']}.")
    if report.get("skipped"):
        lines += ["", *(f"Skipped {name}: {why}." for name, why in report["skipped"].items())]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as the bundle's jobs end (argparse prints the usage too)
        raise SystemExit(f"error: {message}")


def _sets(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        named = ",".join(unknown) if unknown else repr(value)
        raise argparse.ArgumentTypeError(f"{named}: sets are {', '.join(SETS)}")
    return names


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("a positive integer")
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="python -m scripts.tools.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", type=Path, default=BUNDLE / "models" / "model.pt", help="the weights scored")
    parser.add_argument(
        "--compare",
        type=Path,
        help="baseline weights, or the output folder of an earlier suite of them (its scores are reused): paired "
        "differences and the shipping verdict",
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for suite.json, suite.md, eval*/")
    parser.add_argument("--sets", type=_sets, default=list(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    parser.add_argument("--data_root", type=Path, default=BUNDLE.parent.parent / "shared" / "data")
    parser.add_argument(
        "--cache_dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tcmn" / "suite",
        help="where generated sets (held-out clips, stored video) are written once and reused",
    )
    parser.add_argument("--split_file", type=Path, default=CONFIGS / "splits.json", help="val of cvc and vocalfolds")
    parser.add_argument("--eval_args", default="", help='extra evaluation flags for both weights, e.g. "--size 256"')
    parser.add_argument("--baseline_eval_args", help="extra evaluation flags for --compare (default: --eval_args)")
    parser.add_argument("--resamples", type=_positive, default=RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--overwrite", type=as_bool, default=False, help="replace the outputs of an earlier suite")
    args = parser.parse_args(argv)
    if not args.ckpt_path.is_file():
        parser.error(f"--ckpt_path {args.ckpt_path}: no such file")
    if args.compare is not None and args.compare.is_dir():
        for name in ("suite.json", "eval/metrics.json"):
            if not (args.compare / name).is_file():
                parser.error(f"--compare {args.compare}: a folder must be an earlier suite's output ({name} missing)")
    elif args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare {args.compare}: no such file or folder")
    if not args.data_root.is_dir():
        parser.error(f"--data_root {args.data_root}: no such folder")
    if not args.split_file.is_file():
        parser.error(f"--split_file {args.split_file}: no such file")
    if args.cache_dir.exists() and not args.cache_dir.is_dir():
        parser.error(f"--cache_dir {args.cache_dir}: exists and is not a folder")
    if args.baseline_eval_args is not None and args.compare is None:
        parser.error("--baseline_eval_args: only with --compare")
    args.eval_args = _eval_args(parser, "eval_args", args.eval_args)
    extra = args.eval_args if args.baseline_eval_args is None else args.baseline_eval_args
    args.baseline_eval_args = _eval_args(parser, "baseline_eval_args", extra)
    for name in (n for n in STORED_SETS if n in args.sets):  # a drop needs its lossless set
        if STORED_SETS[name][0] not in args.sets:
            args.sets.insert(args.sets.index(name), STORED_SETS[name][0])
    args.sets = [n for n in SETS if n in args.sets]  # lossless sets before their stored copies
    return args


def _eval_args(parser: argparse.ArgumentParser, flag: str, text: str | Sequence[str]) -> list[str]:
    """Split extra evaluation flags and refuse, before any work, those the suite sets itself or evaluate.json does
    not know (their values are checked by the evaluation, as for any evaluation command)."""
    from monai.bundle import ConfigParser

    from scripts.flags import read_command_line

    try:
        tokens = shlex.split(text) if isinstance(text, str) else list(text)
    except ValueError as err:
        parser.error(f"--{flag} {text!r}: {err}")
    config = ConfigParser(ConfigParser.load_config_files(EVALUATE_CONFIGS))
    known = {**config["evaluate_flags"], **config["model_flags"]}
    line = read_command_line(["evaluating", *tokens])
    names = [*line.overrides, *(n for n in line.options if n != "run_id")]
    own = [n for n in names if n in SUITE_FLAGS or n in ("meta_file", "config_file", "args_file")]
    if own:
        parser.error(f"--{flag}: {', '.join('--' + n for n in own)} is set by the suite")
    unknown = [n for n in line.overrides if n not in known and not _in_config(config, n)]
    if unknown:
        named = ", ".join(f"--{n}" for n in unknown)
        parser.error(f"--{flag}: {named}: not an evaluation flag (--help of evaluating lists them)")
    return tokens


def _in_config(config, name: str) -> bool:
    try:
        return name in config
    except TypeError:
        return False


def _variant(tokens: Sequence[str]) -> str:
    for i, token in enumerate(tokens):
        if token.startswith("--variant="):
            return token.partition("=")[2]
        if token == "--variant" and i + 1 < len(tokens):
            return tokens[i + 1]
    return "lite"


def _check_weights(path: Path, tokens: Sequence[str]) -> None:
    """Load the weights into the network they must fit, so a wrong file ends the suite before any set is made."""
    from scripts.network import TCMN, VARIANTS, load_network_weights

    variant = _variant(tokens)
    if variant in VARIANTS:  # another value is the evaluation's to refuse, with its own message
        load_network_weights(TCMN(variant, pretrained=False), path, "cpu")


def _scored(metrics: Mapping, s: SuiteSet) -> bool:
    """Whether an evaluation's metrics hold every sequence of set ``s``."""
    try:
        per_sequence(metrics, s)
    except KeyError:
        return False
    return True


def _earlier_suite(folder: Path, eval_args: Sequence[str]) -> dict:
    """An earlier suite's candidate (weights, digest, evaluation flags) and its metrics, to serve as the baseline
    without evaluating it again; evaluation is deterministic, so the scores are those a new run would give."""
    report = json.loads((folder / "suite.json").read_text())["candidate"]
    if list(report["eval_args"]) != list(eval_args):
        raise InputError(f"--compare {folder}: it was scored with {report['eval_args']}, not {list(eval_args)}")
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    return {"report": {**report, "from": str(folder)}, "metrics": metrics}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def run_suite(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Check every input, make or find the generated sets, evaluate, and write the outputs (all or nothing)."""
    earlier = args.compare is not None and args.compare.is_dir()
    names = OUTPUTS + (BASELINE_OUTPUTS if args.compare and not earlier else ())
    prepare_output_dir(args.output_dir, names, args.overwrite)  # refuse before any work
    _check_weights(args.ckpt_path, args.eval_args)
    if earlier:
        baseline = _earlier_suite(args.compare, args.baseline_eval_args)
    elif args.compare:
        _check_weights(args.compare, args.baseline_eval_args)
    load_split(args.split_file)  # a bad split file ends here, with its own line
    sets, skipped = prepare_sets(args.sets, args.data_root, args.cache_dir, args.split_file)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    if not sets:
        raise InputError(f"--data_root {args.data_root}: none of the sets {', '.join(args.sets)} has its data there")
    with staged_output(args.output_dir, names, args.overwrite) as staging:
        split_path = staging / "suite_split.json"
        split_path.write_text(json.dumps(suite_split(sets), indent=1))
        sides = {"candidate": (args.ckpt_path, "eval", args.eval_args)}
        if args.compare and not earlier:
            sides["baseline"] = (args.compare, "eval_baseline", args.baseline_eval_args)
        metrics = {
            side: run_evaluation(ckpt, sets, split_path, staging / folder, staging / f"{folder}.log", extra)
            for side, (ckpt, folder, extra) in sides.items()
        }
        if earlier:
            metrics["baseline"] = baseline["metrics"]
            missing = [s.name for s in sets if not _scored(metrics["baseline"], s)]
            if missing:
                raise InputError(f"--compare {args.compare}: the earlier suite did not score {', '.join(missing)}")
        report = {
            "command": shlex.join(["python", "-m", "scripts.tools.suite", *argv]),
            "settings": {
                "level": LEVEL,
                "resamples": args.resamples,
                "seed": args.seed,
                "drop_target": DROP_TARGET,
                "data_root": str(args.data_root),
                "cache_dir": str(args.cache_dir),
                "split_file": str(args.split_file),
                "medical_sets": list(MEDICAL),
                "storage": {k: v.description for k, v in STORAGE.items()},
                "heldout_clips": {**HELDOUT_SETTINGS, "held_out": f"one still in {HELD_OUT_EVERY}"},
            },
            **{
                side: {"ckpt_path": str(ckpt), "sha256": _file_digest(ckpt), "eval_args": extra}
                for side, (ckpt, _, extra) in sides.items()
            },
            **({"baseline": baseline["report"]} if earlier else {}),
            "skipped": skipped,
        }
        report.update(summarise(sets, metrics, args.resamples, args.seed))
        (staging / "suite.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        table = markdown(report)
        (staging / "suite.md").write_text(table)
    print(table, end="")
    out = args.output_dir.absolute()
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return run_suite(args, argv)
    except InputError as err:  # a bad input ends the command with one line, as the bundle's jobs do
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
