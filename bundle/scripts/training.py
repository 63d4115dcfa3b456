"""The training iteration and the small handlers MONAI lacks for it.

Training propagates short clips as inference does (`TCMN.propagate_clip`): frame 0's ground truth is written into
memory, every later frame is read from memory, decoded, and its prediction encoded back as a value, so what is trained
is what is run. `ClipPropagation` is the module DDP wraps; `TrainingStep` is the `iteration_update` of MONAI's
`SupervisedTrainer`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Average
from monai.handlers import CheckpointSaver, MLFlowHandler, from_engine
from torch.utils.data import DistributedSampler

from scripts.data import gap_curriculum
from scripts.losses import TemporalContrastiveLoss, pool_embeddings
from scripts.network import TCMN
from scripts.overlay import overlay

logger = logging.getLogger(__name__)


class ClipPropagation(torch.nn.Module):
    """The module DDP wraps: `TCMN.propagate_clip` as its `forward` (DDP only synchronises gradients of work done
    inside `forward`), with the memory write schedule of inference (`mem_every`, `mem_size`; see
    `memory.clip_memory_frames`)."""

    def __init__(self, network: TCMN, mem_every: int = 1, mem_size: int | None = None) -> None:
        super().__init__()
        if mem_every < 1 or (mem_size is not None and mem_size < 0):
            raise ValueError(f"need mem_every >= 1 and mem_size >= 0, got {mem_every}, {mem_size}")
        self.network = network
        self.mem_every, self.mem_size = mem_every, mem_size

    def forward(
        self,
        image: torch.Tensor,
        masks0: torch.Tensor,
        valid: torch.Tensor,
        last_value: bool = True,
        frame_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image B×T×3×H×W, masks0 B×K×H×W, valid B×K, frame_index B×T → logits B×(T−1)×(K+1)×H×W, values
        B×T×K×Cv×h×w."""
        return self.network.propagate_clip(image, masks0, valid, last_value, frame_index, self.mem_every, self.mem_size)


def object_masks(label: torch.Tensor, num_objects: int) -> torch.Tensor:
    """Label map B×1×H×W (0..K) → one-hot object masks B×K×H×W (background dropped)."""
    return F.one_hot(label[:, 0].long().clamp(0, num_objects), num_objects + 1).permute(0, 3, 1, 2)[:, 1:].float()


def term_metrics(terms: Mapping[str, Mapping]) -> dict[str, Average]:
    """The trainer's epoch metrics of the declared loss terms: `epoch_<name>`, the epoch's mean of each term."""
    return {f"epoch_{name}": Average(output_transform=from_engine([name], first=True)) for name in terms}


class TrainingStep:
    """`iteration_update` for `SupervisedTrainer`: clip propagation, then the weighted sum of the declared loss terms.

    `terms` maps each term's name to `{"loss": …, "weight": …}` (`loss_terms` in `train.json`); the sum and every
    term are returned under their names, so logging and the epoch metrics follow the declaration. A term whose loss
    is a `TemporalContrastiveLoss` reads the memory values' object embeddings (0 while `use_contrastive` is off);
    any other is a segmentation loss of each propagated frame's logits against its labels (MONAI's losses). Returns
    a one-item list of dicts, the shape of MONAI's decollated trainer output, so the `from_engine([...], first=True)`
    transforms of `StatsHandler`, `MLFlowHandler` (`--tracking mlflow`) and the loss metrics get floats; from a plain
    dict they would get 1-tuples, which MLflow rejects.
    """

    def __init__(self, terms: Mapping[str, Mapping], use_contrastive: bool = True, max_objects: int = 2) -> None:
        if not terms:
            raise ValueError("TrainingStep needs at least one loss term")
        self.terms = {name: (term["loss"], float(term.get("weight", 1.0))) for name, term in terms.items()}
        self.use_contrastive = use_contrastive
        self.max_objects = max_objects

    def __call__(self, engine: Engine, batch: dict) -> list[dict[str, float]]:
        device = engine.state.device
        image = batch["image"].to(device)  # B×T×3×H×W
        label = batch["label"].to(device)  # B×T×1×H×W
        num_objects = batch["num_objects"].to(device)
        k = self.max_objects
        valid = torch.arange(k, device=device)[None] < num_objects[:, None]
        masks = torch.stack([object_masks(label[:, i], k) for i in range(label.shape[1])], dim=1)  # B×T×K×H×W

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        frame_index = batch["frame_index"].to(device)
        logits, values = engine.network(image, masks[:, 0], valid, self.use_contrastive, frame_index)
        values_of: dict[str, torch.Tensor] = {}
        for name, (loss_fn, _) in self.terms.items():
            if not isinstance(loss_fn, TemporalContrastiveLoss):
                frames = [loss_fn(logits[:, i], label[:, i + 1]) for i in range(logits.shape[1])]
                values_of[name] = torch.stack(frames).mean()
            elif self.use_contrastive:
                values_of[name] = loss_fn(pool_embeddings(values, masks), frame_index, valid)
            else:
                values_of[name] = torch.zeros((), device=device)
        weighted = [values_of[n] if w == 1.0 else w * values_of[n] for n, (_, w) in self.terms.items()]
        loss = weighted[0]
        for term in weighted[1:]:  # in declaration order, so the sum is the same float whatever the terms
            loss = loss + term
        loss.backward()
        engine.optimizer.step()
        return [{"loss": loss.item(), **{name: value.item() for name, value in values_of.items()}}]


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that skips the batches a resumed run has already trained on, and draws fresh clips.

    Ignite restarts the data iterator at the beginning of an epoch on resume; skipping `start` samples of the epoch's
    permutation makes a resumed run see exactly the clips an uninterrupted one would. Indices are offset by
    epoch × len(dataset) so clip datasets that seed their sampling from the index give new clips every epoch.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        indices = [offset + i for i in super().__iter__()]
        start, self.start = self.start, 0
        return iter(indices[start:])

    def __len__(self) -> int:
        return self.num_samples


class SamplerResumer:
    """Keep the sampler's epoch in step with the engine and skip what a resumed epoch already covered."""

    def __init__(self, sampler: ResumableSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Runs after a CheckpointLoader (Events.STARTED) restored the iteration, before the epoch's first batch."""
        self.sampler.set_epoch(engine.state.epoch - 1)
        self.sampler.start = (engine.state.iteration % engine.state.epoch_length) * self.batch_size


class GapCurriculum:
    """Set the clip dataset's maximum frame gap at each epoch start, following `data.gap_curriculum`.

    The curriculum spans the engine's current `max_epochs`, so it follows a `TimeBudget` that shortens the run.
    """

    def __init__(self, dataset, start: int, peak: int, end: int) -> None:
        self.dataset = dataset
        self.start, self.peak, self.end = start, peak, end

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.max_gap = gap_curriculum(
            engine.state.epoch - 1, engine.state.max_epochs, self.start, self.peak, self.end
        )


class BestModelSaver(CheckpointSaver):
    """MONAI's `CheckpointSaver` for the best validation model, with the `state_dict` MONAI's lacks.

    The training checkpoint saves it, so a resumed run knows the best score so far and replaces `model_best.pt` only
    with a better model. MONAI's saver can load that state (`load_state_dict`) but keeps the key-metric `Checkpoint`
    it would come from private: this is the one place that reads it.
    """

    def state_dict(self) -> dict:
        if self._key_metric_checkpoint is None:
            raise ValueError("BestModelSaver needs save_key_metric=True")
        return self._key_metric_checkpoint.state_dict()


class ClipLengthCurriculum:
    """Set the clip dataset's `num_frames` at each epoch start, linear from `start` to `end` over the run's epochs.

    Short clips first teach one-step propagation cheaply; longer ones later let the memory hold several predicted
    frames and the object disappear and come back, as in a video. Follows the engine's `max_epochs` (and so a
    `TimeBudget`); every item of an epoch has the same length, so batches collate.
    """

    def __init__(self, dataset, start: int, end: int) -> None:
        if not 2 <= start <= end:
            raise ValueError(f"need 2 <= start <= end clip frames, got {start}, {end}")
        self.dataset, self.start, self.end = dataset, start, end

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        progress = (engine.state.epoch - 1) / max(engine.state.max_epochs - 1, 1)
        self.dataset.num_frames = round(self.start + (self.end - self.start) * min(progress, 1.0))


def latest_checkpoint(directory: str | Path) -> str:
    """Newest `checkpoint_*.pt` in a run directory (by modification time), or '' when there is none.

    Called for `--resume true` only, so finding none is worth a warning: the run then starts from scratch, which a
    mistyped `--output_dir` would otherwise make look like a resumed run.
    """
    paths = sorted(Path(directory).glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
    if not paths:
        logger.warning(f"--resume true: no checkpoint_*.pt in {directory}, training starts from scratch")
    return str(paths[-1]) if paths else ""


class WarmupCosine:
    """Learning-rate factor: linear warm-up, then cosine decay to 1 % of the base rate at `total_steps`.

    An object rather than a closure so that `TimeBudget` can change its length and `LambdaLR.state_dict` saves it.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 100) -> None:
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """`WarmupCosine` as a per-iteration scheduler."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))


class TimeBudget:
    """Fit a training run into `seconds` of wall-clock time, learning-rate decay included.

    Ignite's `TimeLimit` only stops the engine, leaving the learning rate mid-schedule and the gap curriculum
    mid-way. This handler measures the pace (iterations per second, skipping the first `warmup` iterations of
    start-up) after `probe` iterations and at every epoch end, then sets `max_epochs` to the whole epochs that fit
    in the time left, and stretches or shrinks the `WarmupCosine` schedule to match. It still stops at `seconds` if
    the pace drops. Single-process only: DDP ranks would each decide on their own clock and fall out of step.
    """

    def __init__(
        self,
        seconds: float,
        lr_scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
        probe: int = 30,
        warmup: int = 5,
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"time budget must be positive seconds, got {seconds}")
        if not 0 <= warmup < probe:
            raise ValueError(f"need 0 <= warmup < probe, got warmup={warmup}, probe={probe}")
        self.seconds, self.probe, self.warmup = seconds, probe, warmup
        self.schedule = next((f for f in getattr(lr_scheduler, "lr_lambdas", []) if isinstance(f, WarmupCosine)), None)
        self.started = self.mark = 0.0
        self.first = self.mark_iteration = 0

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ValueError("time_budget works in single-process training only (DDP ranks would disagree)")
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.fit)

    def start(self, engine: Engine) -> None:
        self.started = time.monotonic()
        self.first = engine.state.iteration  # a resumed run starts mid-way

    def on_iteration(self, engine: Engine) -> None:
        done = engine.state.iteration - self.first
        if done == self.warmup:
            self.mark, self.mark_iteration = time.monotonic(), engine.state.iteration
        elif done == self.probe:
            self.fit(engine)
        if time.monotonic() - self.started >= self.seconds:
            engine.terminate()

    def fit(self, engine: Engine) -> None:
        """Set max_epochs (and the schedule's length) to what the measured pace fits in the time left."""
        state = engine.state
        if state.iteration - self.first <= self.warmup:
            return
        now = time.monotonic()
        pace = (state.iteration - self.mark_iteration) / max(now - self.mark, 1e-9)
        total = state.iteration + pace * (self.seconds - (now - self.started))
        state.max_epochs = max(state.epoch, int(total // state.epoch_length))
        if self.schedule is not None:
            self.schedule.total_steps = state.max_epochs * state.epoch_length


def _mlflow_handler(engine: Engine) -> MLFlowHandler | None:
    """The MLFlowHandler that `--tracking mlflow` attached to this engine, if any."""
    for handlers in engine._event_handlers.values():
        for func, _, _ in handlers:
            owner = getattr(func, "__self__", None)
            if isinstance(owner, MLFlowHandler):
                return owner
    return None


class TrackingExtras:
    """What MONAI's MLFlowHandler does not log by itself: hyper-parameters, the loss terms, overlay images and the
    executed config.

    Inactive unless `--tracking mlflow` attached an MLFlowHandler to the trainer; it then writes to that handler's run.
    MONAI saves the executed config as `<output_dir>/config_<time>.json` but hands MLflow a broken path for it when
    `output_dir` is a plain string (it joins the raw value and an expression), so the newest such file in `output_dir`
    is logged here.
    """

    def __init__(
        self,
        params: dict,
        validator: Engine | None = None,
        num_images: int = 2,
        output_dir: str | None = None,
        terms: Sequence[str] = ("seg_loss", "contrastive_loss"),
    ) -> None:
        self.params = params
        self.terms = tuple(terms)  # the declared loss terms, logged every iteration
        self.validator = validator
        self.num_images = num_images
        self.output_dir = output_dir
        self.handler: MLFlowHandler | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        if self.validator is not None:
            self.validator.add_event_handler(Events.ITERATION_COMPLETED, self.on_validation_item, engine)

    def _run(self, engine: Engine):
        if self.handler is None:
            self.handler = _mlflow_handler(engine)
            if self.handler is not None and self.handler.cur_run is not None:
                run_id = self.handler.cur_run.info.run_id
                for key, value in self.params.items():
                    self.handler.client.log_param(run_id, key, value)
                configs = sorted(Path(self.output_dir).glob("config_*.json")) if self.output_dir else []
                if configs:
                    self.handler.client.log_artifact(run_id, str(configs[-1]))
        return self.handler if self.handler is not None and self.handler.cur_run is not None else None

    def on_iteration(self, engine: Engine) -> None:
        handler = self._run(engine)
        if handler is None:
            return
        out = engine.state.output[0]
        for name in self.terms:
            handler.client.log_metric(handler.cur_run.info.run_id, name, out[name], step=engine.state.iteration)

    def on_validation_item(self, validator: Engine, trainer: Engine) -> None:
        handler = self._run(trainer)
        if handler is None or validator.state.iteration > self.num_images:
            return
        item = validator.state.output[0]
        batch = validator.state.batch  # decollated by SupervisedEvaluator: a list of per-sequence dicts
        image = batch[0]["image"] if isinstance(batch, list) else batch["image"][0]  # 3×T×H×W
        t = image.shape[1] // 2
        frame = (image[:, t].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        labels = (
            item["pred"].argmax(0)[t].cpu().numpy() if item["pred"].shape[0] > 1 else item["pred"][0, t].cpu().numpy()
        )
        handler.client.log_image(
            handler.cur_run.info.run_id,
            overlay(frame, labels.astype(np.uint8)),
            f"overlays/epoch{trainer.state.epoch:03d}_seq{validator.state.iteration}.png",
        )
