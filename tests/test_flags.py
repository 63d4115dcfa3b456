"""The command-line check every job runs first (`scripts.flags.check_flags`): unknown flags, bad values, `--help`.

Fast: the command lines are given as lists, against a small config written here and against the shipped configs'
declarations; tests/test_cli.py runs the same mistakes through real `python -m monai.bundle run` processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.errors import InputError
from scripts.flags import TYPES, check_flags, read_command_line
from scripts.network import weights_file

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
FLAGS = {
    "video": {"value": "clip.mp4", "type": "path", "help": "the video"},
    "output_dir": {"value": "out", "type": "path", "help": "folder for the results"},
    "mask_frame": {"value": None, "type": "ints", "optional": True, "help": "annotated frames"},
    "save_png": {"value": False, "type": "bool", "help": "also write PNGs"},
    "save_overlay": {"value": False, "type": "bool", "help": "also write an overlay"},
    "overlay_format": {"value": "mp4", "type": "choice", "choices": ["mp4", "gif"], "help": "the overlay's format"},
    "size": {"value": None, "type": "int", "min": 1, "optional": True, "help": "short side"},
    "device": {"value": "cpu", "type": "device", "help": "where the network runs"},
    "method": {"value": "model", "type": "choice", "choices": ["model", "copy", "flow"], "help": "what propagates"},
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config holding the flags' items, one nested component and one item that is not a documented flag."""
    path = tmp_path / "job.json"
    items = {name: spec["value"] for name, spec in FLAGS.items()}
    path.write_text(json.dumps({**items, "mem_size": 8, "network_def": {"_target_": "Net", "variant": "lite"}}))
    return path


def command(config: Path, *args: str) -> list[str]:
    """What follows `python -m monai.bundle run` for the job `inference` of `config`."""
    return ["inference", "--meta_file", "metadata.json", "--config_file", str(config), *args]


def refusal(config: Path, *args: str, flags: dict | None = None) -> list[str]:
    """The lines `check_flags` ends the job with (SystemExit's message), checked to be a failure."""
    with pytest.raises(SystemExit) as exit_:
        check_flags(flags or FLAGS, command(config, *args))
    assert exit_.value.code not in (0, None)
    return str(exit_.value.code).splitlines()


def with_value(name: str, value: object) -> dict:
    """FLAGS with `name` set to `value`, as the config would hold it after fire parsed `--name value`."""
    return {**FLAGS, name: {**FLAGS[name], "value": value}}


def test_the_command_line_is_read_as_fire_reads_it() -> None:
    line = read_command_line(
        ["training", "--config_file", "['a.json','b.json']", "--video=x.mp4", "--nosave_png", "--size", "-3", "-h"]
    )
    assert line.options == {"run_id": "training", "config_file": ["a.json", "b.json"]}
    assert line.overrides == {"video": "--video=x.mp4", "save_png": "--nosave_png", "size": "--size", "h": "-h"}
    assert read_command_line(["run", "--", "--help"]).overrides == {}  # after `--`: fire's own flags


def test_a_mistyped_flag_lists_the_valid_ones_and_suggests_the_closest(config: Path) -> None:
    lines = refusal(config, "--vidoe", "x.mp4")
    assert lines[-1].startswith("error: unknown flag --vidoe (did you mean --video?)")
    listing = "\n".join(lines[:-1])
    for name in [*FLAGS, "meta_file", "config_file", "logging_file", "run_id", "tracking", "args_file"]:
        assert f"--{name}" in listing, name
    assert "did you mean --save_overlay?" in refusal(config, "--save_overlays", "true")[-1]


def test_existing_config_ids_and_monai_options_stay_valid(config: Path) -> None:
    check_flags(FLAGS, command(config, "--mem_size", "4", "--network_def#variant", "full", "--logging_file", "x"))
    check_flags(FLAGS, command(config, "--tracking", "mlflow", "--tracking_uri", "http://localhost:5000"))
    assert "did you mean --network_def#variant?" in refusal(config, "--network_def#variantt", "full")[-1]
    assert "--tracking_uri" in refusal(config, "--tracking_uri", "http://localhost:5000")[-1]  # without --tracking


def test_help_lists_each_flag_on_its_own_line_and_exits_0(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        check_flags(with_value("size", 0), command(config, "--help"))  # --help wins over a bad value
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, spec in FLAGS.items():
        (line,) = [line for line in lines if line.lstrip().startswith(f"--{name} ")]
        assert spec["help"] in line and "default: " in line, line
    assert any("--overlay_format mp4|gif" in line and "default: mp4" in line for line in lines)


@pytest.mark.parametrize(
    "name, value, shown, accepted",
    [
        ("mask_frame", "middle", "middle", "integers ≥ 0, comma-separated"),
        ("mask_frame", 2.5, "2.5", "integers ≥ 0"),
        ("mask_frame", (0, -5), "0,-5", "integers ≥ 0"),
        ("save_png", "maybe", "maybe", "true or false"),
        ("size", 0, "0", "a positive integer"),
        ("method", "flo", "flo", "one of model, copy, flow"),
        ("overlay_format", "avi", "avi", "one of mp4, gif"),
        ("video", True, "true", "a file or folder path"),  # a bare `--video`
        ("output_dir", 2024, "2024", "a file or folder path (write ./NAME for a name that reads as a number)"),
    ],
)
def test_a_bad_value_ends_with_one_error_line(
    config: Path, name: str, value: object, shown: str, accepted: str
) -> None:
    (line,) = refusal(config, flags=with_value(name, value))
    assert line.startswith(f"error: --{name} {shown}: {accepted}"), line


def test_cuda_is_refused_where_there_is_none(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (line,) = refusal(config, flags=with_value("device", "cuda"))
    assert line == "error: --device cuda: cpu (no CUDA device is available here)"


@pytest.mark.parametrize(
    "name, value",
    [("mask_frame", (0, 5)), ("mask_frame", "0,40"), ("mask_frame", 3), ("save_png", "true"), ("save_png", 1)]
    + [("size", 64), ("device", torch.device("cpu")), ("method", "copy")],
)
def test_good_values_pass(config: Path, name: str, value: object) -> None:
    check_flags(with_value(name, value), command(config))
    check_flags(with_value(name, value))  # in-process (argv is pytest's): only the values are checked


JOBS = {  # each job's config files, as its README command names them
    "inference": ["inference.json"],
    "evaluating": ["inference.json", "evaluate.json"],
    "batch_inference": ["inference.json", "batch_inference.json"],
    "app": ["inference.json", "app.json"],
    "training": ["train.json", "multi_gpu_train.json"],
}
MODEL_JOBS = ["inference", "evaluating", "batch_inference", "app"]


def job_parser(job: str, **overrides: object) -> ConfigParser:
    parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / f) for f in JOBS[job]]))
    parser.update({"device": "$torch.device('cpu')", **overrides})
    return parser


@pytest.mark.parametrize("job", list(JOBS))
def test_each_declared_flag_is_an_item_of_its_config(job: str) -> None:
    """Declarations only check and document: the flag must be a real item, its `value` a reference to it."""
    parser = job_parser(job)
    assert "$scripts.prepare_job(@flags)" in parser["initialize"]
    declared = (
        parser["flags"] if job == "training" else {**parser[f"{JOBS[job][-1][:-5]}_flags"], **parser["model_flags"]}
    )
    assert list(parser.get_parsed_content("flags")) == list(declared)
    for name, spec in declared.items():
        assert name in parser and spec["value"] == f"@{name}", name
        assert spec["type"] in TYPES and spec["help"], name


def test_model_flags_and_defaults_are_declared_once() -> None:
    """The layers over inference.json neither declare a model flag nor set its default (batch inference's device
    excepted: each rank takes its LOCAL_RANK's GPU); only its help line is the layer's own."""
    model = json.loads((CONFIGS / "inference.json").read_text())["model_flags"]
    shared = {*model, "network_def", "network", "memory", "inferer", "propagator", "ckpt_path"}
    for layer in ("evaluate.json", "batch_inference.json", "app.json"):
        raw = json.loads((CONFIGS / layer).read_text())
        own = raw[f"{layer[:-5]}_flags"]
        assert not set(own) & set(model), layer
        assert not (set(raw) & shared) - ({"device"} if layer == "batch_inference.json" else set()), layer
        assert all(key == "model_flags#device#help" for key in raw if key.startswith("model_flags")), layer


@pytest.mark.parametrize("job", MODEL_JOBS)
def test_every_model_job_takes_top_k_none(job: str) -> None:
    """`--top_k none` (as `--help` writes it) is a dense read in every model job, the app included."""
    parser = job_parser(job, top_k="none", size="None")
    check_flags(parser.get_parsed_content("flags"), argv=[])
    assert parser.get_parsed_content("memory").keywords["top_k"] is None
    assert parser.get_parsed_content("inferer").size is None


@pytest.mark.parametrize("job", MODEL_JOBS)
def test_every_model_job_loads_the_variants_own_weights(job: str) -> None:
    """`--variant base` without `--ckpt_path` asks for base weights (not shipped yet, so refused in one line), never
    the lite `model.pt` in a base network."""
    parser = job_parser(job)
    assert parser.get_parsed_content("ckpt_path") == weights_file("lite") and weights_file("lite").endswith("/model.pt")
    parser = job_parser(job, variant="base")
    assert parser.get_parsed_content("ckpt_path") == weights_file("base")
    assert parser.get_parsed_content("network").variant == "base"
    with pytest.raises(RuntimeError) as failed:  # MONAI wraps the expression's error
        parser.get_parsed_content("load_weights")
    assert isinstance(failed.value.__cause__, InputError)
    assert str(failed.value.__cause__).endswith("models/model_base.pt: no such checkpoint file")


def test_another_jobs_flag_is_refused_in_a_layered_job() -> None:
    """evaluate.json lies over inference.json, whose `--save_png` it would silently ignore: refused as unknown."""
    files = str([str(CONFIGS / f) for f in JOBS["evaluating"]])
    flags = job_parser("evaluating").get_parsed_content("flags")
    with pytest.raises(SystemExit) as exit_:
        check_flags(flags, ["evaluating", "--config_file", files, "--save_png", "true"])
    assert str(exit_.value.code).splitlines()[-1] == "error: unknown flag --save_png; --help lists the flags"
    check_flags(flags, ["evaluating", "--config_file", files, "--mem_size", "4", "--memory#top_k", "10"])
