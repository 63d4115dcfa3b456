"""Test-time adaptation: fine-tune a copy of the network on the video at hand before propagating it (opt-in).

A one-shot segmenter sees a new object in a new scene; its annotated frame(s) are the only ground truth there is.
As in test-time training for video object segmentation (Bertrand et al., NeurIPS 2023, for STCN/XMem; Dubuisson et
al. 2025, who tune only bottleneck features), the annotated frames become short clips with synthetic motion, made by
the static stage's own clip machinery (`StaticClipDataset` with the `clip_transforms` and `frame_transforms` of
`pretrain_static.json`), and a targeted part of a *copy* of the network takes a bounded number of training steps on
them, with training's own step (`ClipPropagation`, `TrainingStep` and `train.json`'s `seg_loss`) run by MONAI's
`SupervisedTrainer`. The weights on disk and the network the job loaded are never changed: each video starts from
them again. `PropagationInferer` calls the adaptation (its `adapt`) when it starts a video, so inference, batch
inference, evaluation and the app share it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.handlers import TimeLimit
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from torch import nn

from scripts.data import short_side_shape
from scripts.errors import InputError
from scripts.network import TCMN
from scripts.runtime import RuntimeNetwork
from scripts.static_clips import StaticClipDataset, StaticImage
from scripts.training import ClipPropagation, TrainingStep

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# the parts of TCMN each target trains (module name prefixes); everything else stays frozen
TARGETS = {
    # the value encoder (mask encoder included) and the whole decoder: what turns memory into masks
    "decoder": ("value_encoder.", "decoder."),
    # only the bottleneck where the memory readout meets the frame's stride-16 features (Dubuisson et al.'s choice)
    "bottleneck": ("value_encoder.fuse.", "value_encoder.out.", "decoder.fuse16."),
}


def check_steps(steps: object, quantized: object = None) -> None:
    """The `--adapt_steps` check beyond its type: int8 graphs are calibrated for the weights on disk."""
    if steps and quantized not in (None, ""):
        raise InputError(
            f"--adapt_steps {steps}: adaptation changes the weights, and --quantized {quantized} was calibrated for "
            "the weights on disk; leave out one of them"
        )


def check_lr(lr: object) -> None:
    """The `--adapt_lr` check beyond its type: a learning rate of 0 would train nothing."""
    if not lr > 0:
        raise InputError(f"--adapt_lr {lr}: needs a number > 0")


def static_stage(config_files: tuple[str | Path, ...] | None = None) -> ConfigParser:
    """The static stage's config (`train.json` with `pretrain_static.json` over it), read, not copied."""
    files = config_files or (CONFIG_DIR / "train.json", CONFIG_DIR / "pretrain_static.json")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser


def resized_stills(
    frames: Mapping[int, torch.Tensor], labels: Mapping[int, torch.Tensor], load_size: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Annotated frames as the static stage loads stills (short side `load_size`; 3×h×w image, 1×h×w labels), those
    only where an object survives the resize (a few-pixel object in a large frame may not)."""
    stills = {}
    for t in sorted(frames):
        image = frames[t].float().cpu()  # 1×3×H×W in [0, 1]
        shape = short_side_shape(*image.shape[-2:], load_size)
        image = F.interpolate(image, shape, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
        label = F.interpolate(labels[t].float().cpu()[None, None], shape, mode="nearest-exact")[0]
        if label.max() > 0:
            stills[t] = (image, label)
    return stills


class FrameClips(StaticClipDataset):
    """`StaticClipDataset` over stills already in memory (`resized_stills` of the video being segmented).

    Only where a still comes from differs (`_load`); drawing, clip and frame transforms are the static stage's.
    """

    def __init__(self, stills: Mapping[int, tuple[torch.Tensor, torch.Tensor]], **kwargs) -> None:
        images = [StaticImage("video", Path(f"frame{t}"), Path(f"frame{t}")) for t in sorted(stills)]
        super().__init__(images, cache=False, **kwargs)
        self.stills = {still.image: stills[t] for still, t in zip(images, sorted(stills))}

    def _load(self, still: StaticImage) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stills[still.image]


class FrozenStatistics(ClipPropagation):
    """`ClipPropagation` whose batch-norm layers stay in eval mode when `TrainingStep` switches it to training:
    a few clips of one frame would overwrite statistics learnt from thousands of images."""

    def train(self, mode: bool = True) -> FrozenStatistics:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class TestTimeAdaptation:
    """Fine-tune a copy of the network on clips made from a video's annotated frames; `steps` 0 is off.

    Called with the network a propagator holds (an eager `TCMN`, or the `RuntimeNetwork` wrapping one), the annotated
    frames (index → 1×3×H×W in [0, 1]) and their label maps (index → H×W, objects 1..K); returns the network to
    propagate with: the same object when off, else an adapted copy (wrapped for the same runtime). `target` names the
    trained part (`TARGETS`); training stops after `steps` batches of `batch_size` clips or after `seconds` (0: no
    limit), whichever comes first (with the time limit binding, how many steps ran depends on the machine). Clips are
    drawn from `seed`, so, the step limit binding, the result is the same on every run on the same machine.
    """

    __test__ = False  # not a pytest class, despite its name

    def __init__(
        self,
        steps: int = 0,
        lr: float = 1e-4,
        target: str = "bottleneck",
        batch_size: int = 2,
        seconds: float = 0.0,
        seed: int = 0,
        config_files: tuple[str | Path, ...] | None = None,
    ) -> None:
        if steps < 0 or batch_size < 1 or seconds < 0:
            raise ValueError(f"need steps >= 0, batch_size >= 1, seconds >= 0, got {steps}, {batch_size}, {seconds}")
        check_lr(lr)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
        self.steps, self.lr, self.target, self.batch_size = steps, lr, target, batch_size
        self.seconds, self.seed = seconds, seed
        self.config_files = config_files
        self.last_steps = 0  # steps the last adaptation ran (the time limit can stop it early)

    def __call__(
        self, network: nn.Module, frames: Mapping[int, torch.Tensor], labels: Mapping[int, torch.Tensor]
    ) -> nn.Module:
        if self.steps == 0:
            return network
        eager = network.network if isinstance(network, RuntimeNetwork) else network
        if not isinstance(eager, TCMN):
            raise InputError(
                f"--adapt_steps {self.steps}: needs the eager network (--ckpt_path), not {type(eager).__name__}"
            )
        adapted = self.adapt(eager, frames, labels)
        if adapted is eager:
            return network
        if isinstance(network, RuntimeNetwork):
            return RuntimeNetwork(adapted, network.runtime, threads=network.threads)
        return adapted

    def adapt(self, network: TCMN, frames: Mapping[int, torch.Tensor], labels: Mapping[int, torch.Tensor]) -> TCMN:
        """An eval-mode copy of `network` with its `target` fine-tuned on clips of `frames` (`network` itself, with a
        warning, when no annotated object survives the resize to the static stage's size)."""
        started = time.monotonic()
        stage = static_stage(self.config_files)
        stills = resized_stills(frames, labels, stage["static_load_size"])
        if not stills:
            logger.warning(
                f"--adapt_steps {self.steps}: no annotated object is left at the adaptation's frame size (short side "
                f"{stage['static_load_size']}), too small to make clips of; propagating without adaptation"
            )
            self.last_steps = 0
            return network
        device = next(network.parameters()).device
        adapted = copy.deepcopy(network)
        prefixes = TARGETS[self.target]
        trained = []
        for name, parameter in adapted.named_parameters():
            parameter.requires_grad_(name.startswith(prefixes))
            if parameter.requires_grad:
                trained.append(parameter)
        dataset = FrameClips(
            stills,
            clip_transforms=stage.get_parsed_content("train#clip_transforms"),
            frame_transforms=stage.get_parsed_content("train#frame_transforms"),
            num_frames=stage["num_frames"],
            crop_size=stage["crop_size"],
            max_objects=stage["max_objects"],
            samples_per_epoch=self.steps * self.batch_size,
            paste_prob=0.0,  # an object pasted from another frame would be a copy of the target, not a distractor
            load_size=stage["static_load_size"],
            seed=self.seed,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        # the declared loss terms of training; the contrastive one reads memory values adaptation does not keep
        terms = stage.get_parsed_content("loss_terms")
        step = TrainingStep(terms, use_contrastive=False, max_objects=stage["max_objects"])
        trainer = SupervisedTrainer(
            device=device,
            max_epochs=1,
            train_data_loader=loader,
            network=FrozenStatistics(adapted, stage["mem_every"], stage["mem_size"]),
            optimizer=torch.optim.AdamW(trained, lr=self.lr, weight_decay=stage["weight_decay"]),
            loss_function=stage.get_parsed_content("seg_loss"),
            iteration_update=step,
        )
        trainer.logger.setLevel(logging.WARNING)  # ignite's start and end lines for every video; one line below
        if self.seconds:
            # the trainer was built within the same budget; ignite's TimeLimit takes whole seconds
            remaining = max(int(self.seconds - (time.monotonic() - started)), 1)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(remaining))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            trainer.run()
        self.last_steps = trainer.state.iteration
        logger.info(
            f"adapted the {self.target} to {len(stills)} annotated frame(s): {self.last_steps} steps in "
            f"{time.monotonic() - started:.1f} s"
        )
        adapted.eval().requires_grad_(False)
        return adapted
