"""The evaluation suite: one command scores weights on every yardstick the project has, with bootstrap intervals, and
with ``--compare`` decides whether a candidate ships.

Why a suite: the val splits hold 5 and 2 sequences, so differences of a few hundredths between runs are noise. The
suite adds DAVIS 2016 val (natural video), clips made from the held-out fifth of Kvasir-SEG and of HC18 (objects no
training stage saw), and the cvc and vocalfolds val clips stored as clinics store video (MPEG-4 part 2 AVI, low-bitrate
H.264 MP4, JPEG quality 30, greyscale), and says per set how sure each number is.

    python -m scripts.tools.suite --ckpt_path FILE [--compare BASELINE] --output_dir DIR [--sets cvc_val,…]
        [--data_root ../shared/data] [--cache_dir DIR] [--eval_args "--adapt_steps 5"] [--overwrite true]

Sets (``scripts.tools.suite_sets.SETS``): the val sequences of cvc and vocalfolds and DAVIS 2016 val, clips made from
the held-out stills of Kvasir-SEG and HC18 (``scripts.tools.heldout_clips`` with its defaults: 60 clips of 20 frames,
320², seed 0), and the val sequences of cvc and vocalfolds stored as each ``STORAGE`` (``<set>@<storage>``).
Generated sets are written once into ``--cache_dir`` and reused.

Everything is scored by the bundle's own evaluation: one ``python -m monai.bundle run evaluating`` process per
weights file over all set roots, with a split file naming the suite's sequences (written to the output folder), so
``--eval_args`` pass through to it and are checked by it like any evaluation flag.

Statistics and the shipping rule: ``scripts.tools.suite_stats``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from scripts.data import list_sequences, load_split
from scripts.errors import InputError, OneLineParser
from scripts.flags import as_bool
from scripts.staging import prepare_output_dir, staged_output
from scripts.static_clips import HELD_OUT_EVERY
from scripts.tools.suite_sets import HELDOUT_SETTINGS, MEDICAL, SETS, STORAGE, STORED_SETS, SuiteSet, prepare_sets
from scripts.tools.suite_stats import DROP_TARGET, LEVEL, RESAMPLES, per_sequence, show_interval, summarise

BUNDLE = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE / "configs"
SUITE_FLAGS = ("dataset_dir", "output_dir", "split", "split_file", "ckpt_path", "overwrite", "method")
# the evaluation job's config: evaluate.json is a layer over inference.json
EVALUATE_CONFIGS = [str(CONFIGS / name) for name in ("inference.json", "evaluate.json")]
OUTPUTS = ("suite.json", "suite.md", "suite_split.json", "eval", "eval.log")
BASELINE_OUTPUTS = ("eval_baseline", "eval_baseline.log")


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


# ---------------------------------------------------------------------------------------------------------- reporting
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
        row = [name, str(e["num_sequences"]), f"{c['J&F']:.3f} {show_interval(c['interval'])}", _score(c["Lost"])]
        if compare:
            b, d = e["baseline"], e["difference"]
            row += [f"{b['J&F']:.3f} {show_interval(b['interval'])}", _score(b["Lost"])]
            row += [f"{_signed(d['J&F'])} {show_interval(d['interval'])}"]
        drop = c.get("drop")
        row += [f"{drop['J&F']:.3f} {show_interval(drop['interval'])}" if drop else ""]
        rows.append(row)
    if "medical_mean" in report:
        m = report["medical_mean"]
        row = ["**medical mean**", "", f"{m['candidate']['J&F']:.3f} {show_interval(m['candidate']['interval'])}", ""]
        if compare:
            row += [f"{m['baseline']['J&F']:.3f} {show_interval(m['baseline']['interval'])}", ""]
            row += [f"{_signed(m['difference']['J&F'])} {show_interval(m['difference']['interval'])}"]
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
    parser = OneLineParser(prog="python -m scripts.tools.suite", description=__doc__.split("\n\n")[0])
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
