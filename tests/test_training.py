"""Training workflow: it learns, resumes exactly, tracks to MLflow, keeps DDP ranks in step and writes checkpoints.

Everything runs `bundle/configs/train.json` (in process through `ConfigWorkflow`, or as the README's command) on a
tiny synthetic DAVIS root: three 6-frame 64² echo sequences, one held out for validation, 2-frame clips of 64 px.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.losses import DiceCELoss, DiceLoss
from torch.utils.data import default_collate

from scripts import training
from scripts.data import ClipDataset, list_sequences
from scripts.losses import TemporalContrastiveLoss
from scripts.network import TCMN
from scripts.synthetic import write_echo_dataset
from scripts.training import ClipPropagation, TimeBudget, TrainingStep, term_metrics, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
META = CONFIGS / "metadata.json"
TRAIN = CONFIGS / "train.json"
MULTI_GPU = CONFIGS / "multi_gpu_train.json"
SUBPROCESS_TIMEOUT = 600


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Three 6-frame 64² echo sequences; echo02 is validation, so training and validation both have data."""
    root = tmp_path_factory.mktemp("data")
    write_echo_dataset(root / "echo", num_sequences=3, num_frames=6, height=64, width=64)
    split = root / "split.json"
    split.write_text(json.dumps({"echo/echo00": "train", "echo/echo01": "train", "echo/echo02": "val"}))
    return SimpleNamespace(root=root / "echo", split=split)


def tiny(data: SimpleNamespace, output_dir: Path, **override) -> dict:
    """Overrides that shrink train.json to seconds: own data only, no ImageNet weights, 2-frame 64 px clips."""
    settings = {
        "dataset_dir": str(data.root),
        "split_file": str(data.split),
        "output_dir": str(output_dir),
        "synthetic_echo": False,
        "pretrained": False,
        "use_contrastive": True,  # off by default in train.json; on here so the tests cover the contrastive path
        "crop_size": 64,
        "batch_size": 1,
        "num_frames": 2,
        "num_frames_end": 2,
        "val_size": 32,
        "val_interval": 1,
        "warmup_iterations": 2,
    }
    settings.update(override)
    return settings


def cli_args(settings: dict) -> list[str]:
    """The same settings as command-line flags, booleans spelled as a user types them (fire passes 'false' as str)."""
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def subprocess_env() -> dict[str, str]:
    """One thread per process unless the caller chose otherwise: the DDP test runs two trainers on a small CPU."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "bundle"), env.get("PYTHONPATH")) if p)
    return env


def run_cli(args: list[str], log: Path, launcher: list[str] | None = None) -> None:
    """Run `monai.bundle run training …` from the repository root; fail with the log's tail if it fails."""
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", "training", "--meta_file", str(META), *args]
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT, timeout=SUBPROCESS_TIMEOUT
        )
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n" + log.read_text()[-5000:]


def workflow(settings: dict, config_file: list[str] | str = str(TRAIN)) -> ConfigWorkflow:
    """An initialised in-process training workflow (what `monai.bundle run training` builds)."""
    wf = ConfigWorkflow(config_file=config_file, meta_file=str(META), logging_file=False, run_id="training", **settings)
    wf.initialize()
    return wf


def fixed_clip(
    data: SimpleNamespace, optimizer: type[torch.optim.Optimizer], lr: float
) -> tuple[SimpleNamespace, dict]:
    """A stand-in for the trainer (what `TrainingStep` reads of it) over a fresh lite network, and one 3-frame clip."""
    torch.manual_seed(0)
    clips = ClipDataset(list_sequences(data.root, "train", data.split), num_frames=3, max_gap=2, crop_size=64)
    network = TCMN("lite", pretrained=False, freeze_stride4=True)
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu")),
        network=ClipPropagation(network),
        optimizer=optimizer([p for p in network.parameters() if p.requires_grad], lr=lr),
    )
    return engine, default_collate([clips[0]])


def test_a_few_steps_on_a_fixed_clip_reduce_the_loss(data: SimpleNamespace) -> None:
    """The training iteration (propagation, DiceCE + contrastive, backward, step) must be able to fit one clip."""
    engine, batch = fixed_clip(data, torch.optim.Adam, 1e-3)
    terms = {
        "seg_loss": {"loss": DiceCELoss(to_onehot_y=True, softmax=True), "weight": 1.0},
        "contrastive_loss": {"loss": TemporalContrastiveLoss(pos_gap=1, neg_gap=2), "weight": 0.1},
    }
    step = TrainingStep(terms, max_objects=2)
    losses = [step(engine, batch)[0] for _ in range(10)]
    seg = [out["seg_loss"] for out in losses]
    assert all(torch.isfinite(torch.tensor([out["loss"] for out in losses])))
    assert min(seg[-3:]) < 0.7 * seg[0], f"segmentation loss did not fall: {seg}"
    assert losses[-1]["loss"] < losses[0]["loss"]


def test_the_declared_loss_terms_are_summed_logged_and_averaged(data: SimpleNamespace) -> None:
    """A term added to `loss_terms` is in every step's output and gets its epoch metric, with no code naming it."""
    engine, batch = fixed_clip(data, torch.optim.SGD, 0.0)
    terms = {
        "seg_loss": {"loss": DiceCELoss(to_onehot_y=True, softmax=True), "weight": 1.0},
        "dice": {"loss": DiceLoss(to_onehot_y=True, softmax=True), "weight": 0.5},
        "contrastive_loss": {"loss": TemporalContrastiveLoss(pos_gap=1, neg_gap=2), "weight": 0.1},
    }
    (out,) = TrainingStep(terms, use_contrastive=False)(engine, batch)
    assert list(out) == ["loss", "seg_loss", "dice", "contrastive_loss"]
    assert out["contrastive_loss"] == 0.0 and out["dice"] > 0
    assert out["loss"] == pytest.approx(out["seg_loss"] + 0.5 * out["dice"], rel=1e-6)
    assert list(term_metrics(terms)) == ["epoch_seg_loss", "epoch_dice", "epoch_contrastive_loss"]


def test_boolean_flags_given_as_strings_mean_what_they_say(data: SimpleNamespace, tmp_path: Path) -> None:
    """fire passes `--resume false` as the string 'false', which Python would treat as true."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint_iteration=2.pt").write_bytes(b"")  # must not be loaded
    wf = workflow(
        tiny(
            data,
            tmp_path,
            resume="false",
            use_contrastive="false",
            synthetic_echo="false",
            freeze_stride4="false",
            pretrained="false",
        )
    )
    savers = ["CheckpointSaver", "CheckpointSaver"]  # the run's checkpoints, the averaged weights
    assert [type(h).__name__ for h in wf.parser.get_parsed_content("train#checkpoint_handlers")] == savers
    assert wf.parser.get_parsed_content("train#step").use_contrastive is False
    assert wf.parser.get_parsed_content("roots") == [str(data.root)]
    assert all(p.requires_grad for p in wf.parser.get_parsed_content("network").key_encoder.stem.parameters())
    on = workflow(tiny(data, tmp_path, resume="true", use_contrastive="true", freeze_stride4="true"))
    assert [type(h).__name__ for h in on.parser.get_parsed_content("train#checkpoint_handlers")] == [
        *savers,
        "CheckpointLoader",
    ]
    assert on.parser.get_parsed_content("train#step").use_contrastive is True
    assert not any(p.requires_grad for p in on.parser.get_parsed_content("network").key_encoder.stem.parameters())


def test_resume_without_a_checkpoint_warns(
    data: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--resume true` with no checkpoint in the run folder trains from scratch, and one warning line says so."""
    # MONAI's logger warns "Logging file is set to False"; once a logging configuration lets it reach the root
    # logger (as an earlier in-process run's may), pytest captures it too: it must not count as ours
    monkeypatch.setattr(logging.getLogger("monai.bundle.workflows"), "propagate", True)
    wf = workflow(tiny(data, tmp_path, resume="true"))
    with caplog.at_level(logging.WARNING, logger="scripts.training"):
        assert wf.parser.get_parsed_content("resume_from") == ""
    # the bundle's own logger only: MONAI warns on its own too ("Logging file is set to False"), which is not ours
    (record,) = [r for r in caplog.records if r.name == "scripts.training" and r.levelno == logging.WARNING]
    assert str(tmp_path / "checkpoints") in record.getMessage() and "\n" not in record.getMessage()


def train_in_process(settings: dict, stop_at: int | None = None) -> tuple[ConfigWorkflow, list[dict]]:
    """Run train.json in process, optionally stopping (Ignite `terminate`) after iteration `stop_at`.

    Returns the workflow and, per iteration, what the trainer saw and produced, to compare runs clip by clip.
    """
    wf = workflow(settings)
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen: list[dict] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine) -> None:
        seen.append(
            {
                "iteration": engine.state.iteration,
                "frame_index": engine.state.batch["frame_index"].tolist(),
                "image_sum": float(engine.state.batch["image"].double().sum()),
                "loss": engine.state.output[0]["loss"],
                "lr": engine.optimizer.param_groups[0]["lr"],
            }
        )

    if stop_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda engine: engine.terminate())
    wf.run()
    wf.finalize()
    return wf, seen


def test_resumed_run_matches_an_uninterrupted_one(data: SimpleNamespace, tmp_path: Path) -> None:
    """Stopping after iteration 6 of 2 epochs × 4 and resuming must give the uninterrupted run's clips and weights.

    Iteration 6 is mid-epoch, so this needs the sampler to skip the epoch's first two batches, the curriculum and
    the sampler epoch to be set for epoch 2, and optimiser, LR schedule and trainer state to be restored.
    """
    settings = {"max_epochs": 2, "epoch_length": 4, "checkpoint_interval": 2, "max_objects": 2}
    full, full_seen = train_in_process(tiny(data, tmp_path / "full", **settings))
    assert [s["iteration"] for s in full_seen] == list(range(1, 9))

    _, first_seen = train_in_process(tiny(data, tmp_path / "stopped", **settings), stop_at=6)
    assert [s["iteration"] for s in first_seen] == list(range(1, 7))
    assert (tmp_path / "stopped" / "checkpoints" / "checkpoint_iteration=6.pt").is_file()

    resumed, resumed_seen = train_in_process(tiny(data, tmp_path / "stopped", resume="true", **settings))
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 8
    assert [s["iteration"] for s in resumed_seen] == [7, 8], "the resumed run did not continue from iteration 6"
    assert resumed_seen == full_seen[6:], "the resumed run saw other clips, losses or learning rates"

    stopped = torch.load(tmp_path / "stopped" / "checkpoints" / "checkpoint_iteration=6.pt", weights_only=True)
    assert len(stopped["best_tracker"]["_saved"]) == 1, "the best validation score so far must be checkpointed"
    best = [
        resumed.parser.get_parsed_content("validate#best_saver"),
        full.parser.get_parsed_content("validate#best_saver"),
    ]
    assert best[0].state_dict() == best[1].state_dict(), "after resume, model_best.pt must track the same best"
    expected = full.parser.get_parsed_content("network").state_dict()
    actual = resumed.parser.get_parsed_content("network").state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name].float(), actual[name].float(), atol=1e-6), name


class FakeClock:
    """`time.monotonic` for `TimeBudget`, advanced by the engine's own iterations instead of the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked_engine(clock: FakeClock, seconds_per_iteration: list[float]) -> Engine:
    """An Ignite engine whose iteration `i` (1-based) takes `seconds_per_iteration[i - 1]` fake seconds."""

    def step(engine: Engine, batch: int) -> None:
        clock.now += seconds_per_iteration[engine.state.iteration - 1]

    return Engine(step)


def test_time_budget_fits_epochs_and_schedule_to_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 1 s per iteration, a 100 s budget of 10-iteration epochs becomes 10 epochs and a 100-step cosine."""
    clock = FakeClock()
    monkeypatch.setattr(training.time, "monotonic", clock)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=10_000, warmup_steps=5)
    engine = clocked_engine(clock, [1.0] * 10_000)
    TimeBudget(100, scheduler, probe=20, warmup=5).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scheduler.step())
    engine.run(range(10), max_epochs=1000, epoch_length=10)
    assert engine.state.iteration == 100 and engine.state.max_epochs == 10
    assert scheduler.lr_lambdas[0].total_steps == 100
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01, abs=1e-3), "the cosine must have decayed"
    assert "total_steps" in str(scheduler.state_dict()["lr_lambdas"]), "a resumed run must get the fitted length"


def test_time_budget_stops_at_the_deadline_when_the_pace_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Iterations that slow from 1 s to 5 s after the probe cannot overrun the budget by more than one iteration."""
    clock = FakeClock()
    monkeypatch.setattr(training.time, "monotonic", clock)
    engine = clocked_engine(clock, [1.0] * 20 + [5.0] * 10_000)
    TimeBudget(100, probe=20, warmup=5).attach(engine)
    engine.run(range(10), max_epochs=1000, epoch_length=10)
    assert clock.now - 1000.0 <= 105
    assert engine.state.iteration < 100


def test_time_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0)
    with pytest.raises(ValueError, match="warmup"):
        TimeBudget(10, probe=5, warmup=5)


def test_init_weights_and_workers(data: SimpleNamespace, tmp_path: Path) -> None:
    """`--init_weights` starts from a plain state dict (e.g. the shipped model.pt); loading runs in DataLoader
    workers; `--time_budget` attaches the budget handler."""
    source = TCMN("lite", pretrained=False, freeze_stride4=True)
    torch.nn.init.constant_(source.decoder.pred.weight, 0.5)  # not what a fresh network starts from
    weights = tmp_path / "init.pt"
    torch.save(source.state_dict(), weights)
    settings = tiny(
        data,
        tmp_path / "run",
        max_epochs=1,
        epoch_length=2,
        learning_rate=0.0,
        num_workers=2,
        init_weights=str(weights),
        time_budget=600,
        val_interval=5,
    )
    wf, seen = train_in_process(settings)
    assert [s["iteration"] for s in seen] == [1, 2]
    handlers = [type(h).__name__ for h in wf.parser.get_parsed_content("train#handlers")]
    assert "TimeBudget" in handlers
    trained = wf.parser.get_parsed_content("network")
    for (name, expected), actual in zip(source.named_parameters(), trained.parameters()):
        assert torch.equal(expected, actual.detach().cpu()), f"{name} was not initialised from --init_weights"


def test_base_variant_and_the_video_stage_schedule_train(data: SimpleNamespace, tmp_path: Path) -> None:
    """`--variant base` (ImageNet Lite2 key encoder) trains with train.json's video-stage settings: clips growing from
    2 to 4 frames over the epochs, memory written on the inference schedule (`mem_every`, `mem_size`)."""
    settings = tiny(
        data, tmp_path / "run", variant="base", pretrained=True, max_epochs=2, epoch_length=2, num_frames_end=4
    )
    settings.update(mem_every=2, mem_size=1, val_interval=5)
    wf, seen = train_in_process(settings)
    assert [s["iteration"] for s in seen] == [1, 2, 3, 4] and all(s["loss"] == s["loss"] for s in seen)
    assert [len(s["frame_index"][0]) for s in seen] == [2, 2, 4, 4]  # the clip length curriculum
    model = wf.parser.get_parsed_content("train#model")
    assert (model.mem_every, model.mem_size, model.network.variant) == (2, 1, "base")


@pytest.fixture(scope="module")
def local_run(data: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's training command with `--tracking mlflow` and no tracking URI: 1 epoch × 3 iterations."""
    out = tmp_path_factory.mktemp("local_run")
    settings = tiny(data, out, max_epochs=1, epoch_length=3, checkpoint_interval=2)
    run_cli(["--config_file", str(TRAIN), *cli_args(settings), "--tracking", "mlflow"], out / "train.log")
    return out


def check_tracked_run(uri: str, experiment: str = "tcmn") -> tuple[object, object]:
    """The one finished run of `experiment` at `uri` has the losses, learning rate, validation J&F and params."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    metrics = set(run.data.metrics)
    expected = {"train_loss", "seg_loss", "contrastive_loss", "lr_group_0", "val_jf", "epoch_loss"}
    assert expected <= metrics, f"missing metrics {expected - metrics}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "seg_loss")] == [1, 2, 3]
    assert 0 <= run.data.metrics["val_jf"] <= 1
    params = run.data.params
    assert params["variant"] == "lite" and float(params["learning_rate"]) == 0.0002
    assert params["pretrained"] == "False" and params["use_contrastive"] == "True"
    assert params["epoch_length"] == "3"
    logged = [a.path for a in client.list_artifacts(run.info.run_id)]
    executed = [a for a in logged if a.startswith("config_") and a.endswith(".json")]
    assert len(executed) == 1, f"the executed config is not among the run's artifacts {logged}"
    config = json.loads(Path(client.download_artifacts(run.info.run_id, executed[0])).read_text())
    assert config["epoch_length"] == 3 and config["variant"] == "lite"
    return client, run


@pytest.mark.slow
def test_local_mlflow_store(local_run: Path) -> None:
    """Without a tracking URI the run goes to `<output_dir>/mlruns.db` (MLflow 3 has no file store)."""
    db = local_run / "mlruns.db"
    assert db.is_file()
    check_tracked_run(f"sqlite:///{db}")


@pytest.mark.slow
def test_checkpoint_outputs(local_run: Path) -> None:
    """A 1-epoch run leaves interval, final and best checkpoints, and the best one is a plain TCMN state dict."""
    ckpt = local_run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checkpoint_final.pt",
        "checkpoint_iteration=2.pt",
        "model_best.pt",
        "model_ema.pt",
    ]
    final = torch.load(ckpt / "checkpoint_final.pt", weights_only=True, map_location="cpu")
    assert set(final) == {"network", "optimizer", "lr_scheduler", "trainer", "best_tracker", "weight_average"}
    assert final["trainer"]["iteration"] == 3
    best = torch.load(ckpt / "model_best.pt", weights_only=True, map_location="cpu")
    network = TCMN("lite", pretrained=False, freeze_stride4=True)
    network.load_state_dict(best, strict=True)
    ema = torch.load(ckpt / "model_ema.pt", weights_only=True, map_location="cpu")
    network.load_state_dict(ema, strict=True)  # the averaged weights are a plain state dict too
    assert all(torch.equal(ema[k], v) for k, v in final["weight_average"].items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free local port (SQLite backend, local artifact root), stopped afterwards."""
    port = free_port()
    log = open(tmp_path / "mlflow_server.log", "w")
    env = subprocess_env()
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner worker pool: faster start, clean stop
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd += ["--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow_server.log").read_text()[-3000:])
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_mlflow_server_tracking(mlflow_server: str, data: SimpleNamespace, tmp_path: Path) -> None:
    """`--tracking mlflow --tracking_uri http://…` logs losses, learning rate, J&F, params and overlay images."""
    settings = tiny(data, tmp_path / "run", max_epochs=1, epoch_length=3, checkpoint_interval=2)
    args = ["--config_file", str(TRAIN), *cli_args(settings), "--tracking", "mlflow", "--tracking_uri", mlflow_server]
    run_cli(args, tmp_path / "train.log")
    client, run = check_tracked_run(mlflow_server)
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    assert overlays and all(p.startswith("overlays/") and p.endswith(".png") for p in overlays), overlays
    assert not (tmp_path / "run" / "mlruns.db").exists(), "a server run must not also write a local store"


@pytest.mark.slow
def test_ddp_ranks_stay_in_step(data: SimpleNamespace, tmp_path: Path) -> None:
    """Two gloo ranks (torchrun) end with identical parameters, each trains its own share, only rank 0 saves.

    A third config, layered on top, gives rank 1 its own checkpoint folder (it must stay empty) and saves each
    rank's weights, batches per epoch and last epoch's sample indices before the process group is torn down.
    BatchNorm running statistics are not compared: without SyncBatchNorm (CUDA only) each rank keeps its own, and
    rank 0's go into the checkpoint.
    """
    out = tmp_path / "run"
    probe = tmp_path / "probe.json"
    rank = "str(torch.distributed.get_rank())"
    probe.write_text(
        json.dumps(
            {
                "ckpt_dir": f"$@output_dir + '/checkpoints' + ('' if {rank} == '0' else '_rank' + {rank})",
                "finalize": [
                    "$torch.save({'state': @network.state_dict(), 'iteration': @train#trainer.state.iteration,"
                    " 'batches': len(@train#dataloader), 'indices': list(@train#sampler)},"
                    f" @output_dir + '/rank' + {rank} + '.pt')",
                    "$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()",
                ],
            }
        )
    )
    settings = tiny(data, out, max_epochs=1, epoch_length=2, checkpoint_interval=1)
    configs = str([str(TRAIN), str(MULTI_GPU), str(probe)])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_cli(["--config_file", configs, *cli_args(settings)], tmp_path / "train.log", launcher=launcher)

    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    for r in (rank0, rank1):
        assert r["iteration"] == 2
        assert r["batches"] == 2, "each rank must have epoch_length batches, not repeat a share of them"
    assert not set(rank0["indices"]) & set(rank1["indices"]), "ranks trained on the same clips"
    network = TCMN("lite", pretrained=False, freeze_stride4=True)
    parameters = {name for name, _ in network.named_parameters()}
    for name in parameters:
        assert torch.equal(rank0["state"][name], rank1["state"][name]), f"ranks differ in {name}"

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint_final.pt",
        "checkpoint_iteration=2.pt",  # n_saved=1: the interval checkpoint of iteration 1 was replaced
        "model_best.pt",
        "model_ema.pt",
    ]
    rank1_dir = out / "checkpoints_rank1"
    assert not rank1_dir.exists() or not any(rank1_dir.iterdir()), "rank 1 wrote checkpoints"
    final = torch.load(out / "checkpoints" / "checkpoint_final.pt", weights_only=True)["network"]
    for name, value in rank0["state"].items():
        assert torch.equal(final[name], value), name


def test_training_benchmark_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's measurement runs end to end (at toy size; its numbers are not checked here)."""
    from scripts.tools import benchmark_training

    args = benchmark_training.parse_args(
        ["--variant", "lite", "--iterations", "1", "--warmup", "0", "--size", "32", "--batch_size", "1"]
    )
    args.variant = "lite"
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test process's thread count alone
    result = benchmark_training.measure(args)
    assert result["clips_per_second"] > 0 and result["peak_rss_mib"] > 0
    assert result["trainable_params"] < sum(p.numel() for p in TCMN("lite", pretrained=False).parameters())
