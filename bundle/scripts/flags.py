"""Command-line flags: the one place where `--flag value` strings are checked and converted.

Each config declares the flags it documents in its `flags` section (value, type, allowed values, one line of help)
and hands them to `check_flags` first thing (`scripts.prepare_job(@flags)` in `initialize`). It reads the command
line that `python -m monai.bundle run` got, so that a mistyped flag, a bad value or `--help` ends the job before any
work: MONAI itself accepts any `--name value` as a new config item and would silently ignore a typo. The values
checked are the config's own after MONAI applied the overrides (each declaration's `value` is `@name`), so overrides
from an `--args_file` or given in process are checked too.

`python -m monai.bundle run … --save_png true` hands the config the string 'true' (fire parses only Python literals),
and a non-empty string is truthy, so every boolean flag goes through `as_bool` once (and every optional one through
`optional`): in the `parsed` block of each config for flags the configs use, in the job's constructor for flags it
receives raw. `flags` declares the flags (what they take, their help), `parsed` holds their converted values.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.scripts import create_workflow, run
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

from scripts.errors import DEBUG_ENV, InputError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")
HELP_FLAGS = ("help", "h")
DEBUG_FLAG = "debug"  # every job's: `--debug true` shows the traceback of a failure (`scripts.errors`)
TYPES = ("bool", "int", "ints", "number", "choice", "device", "path", "paths", "text")


def as_bool(value: object) -> bool:
    """Command-line flags arrive as bools, ints or strings ('true', 'false', '1', '0')."""
    if isinstance(value, str):
        if value.strip().lower() in TRUE:
            return True
        if value.strip().lower() in FALSE:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def is_none(value: object) -> bool:
    """An optional flag left out: None, '' or 'none' as `--help` shows it (fire reads only `None` as Python's)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def optional(value: object) -> object:
    """An optional flag's value for the objects it configures: None where `is_none`, else the value itself."""
    return None if is_none(value) else value


def as_list(value: object) -> list:
    """'a,b' strings, tuples (as fire parses '0,5') and scalars → list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class CommandLine:
    """What fire makes of `python -m monai.bundle run ARGS`: `run`'s own arguments and the config overrides."""

    options: dict[str, object] = field(default_factory=dict)  # run/create_workflow/ConfigWorkflow arguments, parsed
    overrides: dict[str, str] = field(default_factory=dict)  # every other `--name`: name → the token as typed
    values: dict[str, str] = field(default_factory=dict)  # every other `--name`: name → its value as typed


def monai_options() -> tuple[str, ...]:
    """The keyword arguments `python -m monai.bundle run` passes on to MONAI rather than into the config."""
    names: dict[str, None] = {}
    for function in (run, create_workflow, ConfigWorkflow.__init__):
        for name, parameter in inspect.signature(function).parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                names[name] = None
    return tuple(names)


def _is_flag(token: str) -> bool:
    """fire's test: '--x' or '-x', but not a negative number."""
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


def read_command_line(args: Sequence[str]) -> CommandLine:
    """Split `run`'s arguments (what follows `run` on the command line) the way fire does for `monai.bundle.run`.

    `--name value`, `--name=value`, a bare `--name` (True) or `--noname` (False), hyphens read as underscores,
    positional arguments filling `run`'s parameters in order; whatever follows a final `--` is fire's own.
    """
    args = list(args)
    if "--" in args:
        args = args[: len(args) - 1 - args[::-1].index("--")]
    parameters = [n for n, p in inspect.signature(run).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    known, named, positional = set(monai_options()), {}, []
    i = 0
    while i < len(args):
        token = args[i]
        if not _is_flag(token):
            positional.append(token)
            i += 1
            continue
        key, equals, value = token.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not equals:
            if i + 1 < len(args) and not _is_flag(args[i + 1]):
                value, i = args[i + 1], i + 1
            elif key not in parameters and key.startswith("no"):
                key, value = key[2:], "False"
            else:
                value = "True"
        named[key] = (token, value)
        i += 1
    free = iter(p for p in parameters if p not in named)
    line = CommandLine()
    for value in positional:
        name = next(free, None)
        if name is not None:
            line.options[name] = DefaultParseValue(value)
    for key, (token, value) in named.items():
        if key in known:
            line.options[key] = DefaultParseValue(value)
        else:
            line.overrides[key], line.values[key] = token, value
    return line


def launched_command_line() -> list[str] | None:
    """The arguments after `run` when this process is `python -m monai.bundle run …` (torchrun's workers included);
    None in-process (tests, notebooks), where `sys.argv` belongs to someone else."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name != "monai.bundle.__main__" or len(sys.argv) < 2 or sys.argv[1] != "run":
        return None
    return sys.argv[2:]


def job_and_debug(argv: Sequence[str] | None = None) -> tuple[str | None, bool]:
    """The job (`run_id`) this process runs and whether `--debug` is on, from its command line (None, False
    in-process); a bad `--debug` value counts as off here and is refused by `check_flags`."""
    argv = launched_command_line() if argv is None else argv
    if argv is None:
        return None, False
    line = read_command_line(argv)
    try:
        debug = as_bool(line.values.get(DEBUG_FLAG, "false"))
    except ValueError:
        debug = False
    return str(line.options.get("run_id") or "") or None, debug


def _config_ids(line: CommandLine) -> ConfigParser:
    """The merged configs (and tracking settings) the command names, as a parser: any id in them may be overridden."""
    options = dict(line.options)
    if options.get("args_file"):  # its entries are defaults the command line overrides, as in MONAI's `run`
        options = {**ConfigParser.load_config_file(options["args_file"]), **options}
    parser = ConfigParser(ConfigParser.load_config_files(options["config_file"]) if options.get("config_file") else {})
    tracking = options.get("tracking")
    if tracking:
        settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else tracking
        if settings is None:
            settings = ConfigParser.load_config_files(tracking)
        for key, value in settings.get("configs", {}).items():
            if key not in parser:
                parser[key] = value
    return parser


def show(value: object) -> str:
    """A value as a user would type it: true/false, 0,40 for a list, none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    return str(value)


def _placeholder(spec: Mapping) -> str:
    kind = spec.get("type", "text")
    return {
        "bool": "true|false",
        "int": "N",
        "ints": "N[,N…]",
        "number": "X",
        "choice": "|".join(map(str, spec.get("choices", ()))),
        "device": "cpu|cuda[:N]",
        "path": "PATH",
        "paths": "PATH[,PATH…]",
    }.get(kind, "TEXT")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _devices() -> str:
    """What `--device` accepts on this machine."""
    if not torch.cuda.is_available():
        return "cpu (no CUDA device is available here)"
    count = torch.cuda.device_count()
    return "cpu, cuda or " + ("cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}")


def _valid_device(value: object) -> bool:
    try:
        device = torch.device(value)
    except (TypeError, RuntimeError, ValueError):
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return device.index is None or device.index < torch.cuda.device_count()


def accepted(spec: Mapping, value: object) -> str | None:
    """None when `value` suits the declaration `spec`; otherwise what the flag accepts, for the error message."""
    kind = spec.get("type", "text")
    if kind not in TYPES:
        raise ValueError(f"flag type {kind!r} is not one of {TYPES}")
    if spec.get("optional") and is_none(value):
        return None
    if kind == "bool":
        ok = isinstance(value, bool) or value in (0, 1)
        ok = ok or (isinstance(value, str) and value.strip().lower() in TRUE + FALSE)
        return None if ok else "true or false"
    if kind in ("int", "number"):
        return _number(value, kind == "int", spec.get("min"))
    if kind == "ints":
        items = [int(v) if isinstance(v, str) and v.isdigit() else v for v in as_list(value)]
        ok = bool(items) and all(_is_int(v) and v >= 0 for v in items)
        return None if ok else "integers ≥ 0, comma-separated for several annotations (0 or 0,40)"
    if kind == "choice":
        choices = list(spec.get("choices", ()))
        return None if value in choices else "one of " + ", ".join(map(str, choices))
    if kind == "device":
        return None if _valid_device(value) else _devices()
    if kind in ("path", "paths"):
        items = as_list(value) if kind == "paths" else [value]
        if items and all(isinstance(v, (str, Path)) and str(v) for v in items):
            return None
        what = "a file or folder path" if kind == "path" else "one or more paths, comma-separated"
        numbers = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
        return what + (" (write ./NAME for a name that reads as a number)" if numbers else "")
    return None if isinstance(value, str) else "text"


def _number(value: object, integer: bool, low: float | None) -> str | None:
    """The int/number check: None when fine, else what is accepted ('a positive integer', 'a number ≥ 0')."""
    ok = _is_int(value) or (not integer and isinstance(value, float))
    if integer:
        what = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
            low, f"an integer ≥ {low}"
        )
    else:
        what = "a number" if low is None else f"a number ≥ {low}"
    return None if ok and (low is None or value >= low) else what


def help_text(job: str, flags: Mapping[str, Mapping], given: Sequence[str] = ()) -> str:
    """`--help`: one line per flag (name, values, what it does, default), then what else MONAI accepts."""
    rows = [(name, f"--{name} {_placeholder(spec)}", spec) for name, spec in flags.items()]
    width = max((len(left) for _, left, _ in rows), default=0)
    lines = [f"python -m monai.bundle run {job}{' ' if job else ''}--meta_file … --config_file … [--flag VALUE …]"]
    lines += ["", "flags:"]
    for name, left, spec in rows:
        value = f"{'set to' if name in given else 'default'}: {show(spec.get('value')) or 'none'}"
        lines.append(f"  {left:<{width}}  {spec.get('help', '')} ({value})")
    debug = f"--{DEBUG_FLAG} true|false"
    lines.append(f"  {debug:<{width}}  show the traceback of a failure (also {DEBUG_ENV}=1) (default: false)")
    lines += ["", _also_accepted()]
    return "\n".join(lines)


def _also_accepted() -> str:
    names = ", ".join(f"--{n}" for n in monai_options())
    return f"MONAI's own options: {names}; any other id already in the config can be overridden (--id or --id#key)."


def _has(parser: ConfigParser, name: str) -> bool:
    """`name in parser`, also for an id that goes below a plain value (`video#x`), which MONAI's check raises on."""
    try:
        return name in parser
    except TypeError:
        return False


def other_jobs_flags(parser: ConfigParser, flags: Mapping[str, Mapping]) -> set[str]:
    """Flags declared in the configs (a section of `{name: {"value": "@name", …}}` declarations) but not this job's:
    in a job layered over `inference.json`, the inference job's own flags (`--video`, `--save_png`) are items of the
    merged config, yet the job would silently ignore them, so they are refused as any unknown flag is."""
    declared = set()
    for section in parser.get().values():
        if isinstance(section, Mapping) and section:
            if all(isinstance(v, Mapping) and v.get("value") == f"@{k}" for k, v in section.items()):
                declared.update(section)
    return declared - set(flags)


def _suggestion(name: str, candidates: Sequence[str], parser: ConfigParser) -> str | None:
    """The closest valid name (difflib), among the siblings of a nested id `a#b`."""
    if "#" in name:
        parent, _, key = name.rpartition("#")
        siblings = parser.get(parent) if _has(parser, parent) else None
        if isinstance(siblings, Mapping):
            match = difflib.get_close_matches(key, [str(k) for k in siblings], n=1)
            return f"{parent}#{match[0]}" if match else None
        return None
    match = difflib.get_close_matches(name, candidates, n=1)
    return match[0] if match else None


def check_flags(flags: Mapping[str, Mapping], argv: Sequence[str] | None = None) -> None:
    """Refuse an unknown flag or a bad value with one `error: …` line, or print `--help`, ending the job (SystemExit).

    `flags` maps each documented flag to its declaration: `value` (the config's, after overrides), `type` (one of
    `TYPES`), `help`, and `min`, `choices`, `optional` (none or '' allowed) where they apply, and `check`: a callable
    given a value of the right type, for what the type cannot tell (a package installed, another flag's value), whose
    `InputError` ends the job the same way, its message the line. `argv` is what follows `run` on the command line;
    by default the process's own when it is `python -m monai.bundle run`, otherwise only the values are checked.
    SystemExit, because MONAI wraps any other exception of a config expression in a long traceback that ends with its
    own generic line.
    """
    argv = launched_command_line() if argv is None else argv
    if argv is not None:
        line = read_command_line(argv)
        job = str(line.options.get("run_id") or "")
        if any(h in line.overrides for h in HELP_FLAGS):
            print(help_text(job, flags, list(line.overrides)))
            raise SystemExit(0)
        parser = _config_ids(line)
        if DEBUG_FLAG in line.values and accepted({"type": "bool"}, line.values[DEBUG_FLAG]) is not None:
            raise SystemExit(f"error: --{DEBUG_FLAG} {line.values[DEBUG_FLAG]}: true or false")
        known = (*flags, DEBUG_FLAG)
        others = other_jobs_flags(parser, flags)
        unknown = [n for n in line.overrides if n not in known and (n in others or not _has(parser, n))]
        if unknown:
            ids = (k for k in parser.get() if not str(k).startswith("_") and k not in others)
            candidates = [*known, *monai_options(), *ids]
            named = []
            for name in unknown:
                match = _suggestion(name, candidates, parser)
                typed = line.overrides[name].partition("=")[0]
                named.append(typed + (f" (did you mean --{match}?)" if match else ""))
            listing = f"{job}{' ' if job else ''}flags: " + ", ".join(f"--{n}" for n in flags)
            plural = "s" if len(unknown) > 1 else ""
            raise SystemExit(
                f"{listing}\n{_also_accepted()}\nerror: unknown flag{plural} {', '.join(named)}; --help lists the flags"
            )
    for name, spec in flags.items():
        problem = accepted(spec, spec.get("value"))
        if problem is not None:
            raise SystemExit(f"error: --{name} {show(spec.get('value'))}: {problem}")
        if spec.get("check") is not None and not (spec.get("optional") and is_none(spec.get("value"))):
            try:
                spec["check"](spec.get("value"))
            except InputError as err:
                raise SystemExit(f"error: {err}") from None
