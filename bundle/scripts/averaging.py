"""An exponential moving average of the network's weights during training (stable weights).

A few small steps on one video can swing a network's output by tenths of J&F; the average of the weights over the
last few hundred iterations moves far less and usually generalises better (Polyak averaging; Cutie and SAM 2 ship
averaged weights). Ignite's `EMAHandler` does the averaging; this adds the two things a bundle run needs from it.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler

__all__ = ["WeightAverage"]


class WeightAverage(EMAHandler):
    """`EMAHandler` that starts from the weights training really starts from, and is checkpointed.

    Ignite copies the network when the handler is built, which in a bundle is before `CheckpointLoader` loads
    ``--init_weights`` (at ``STARTED``); so the average restarts from the network at the run's first iteration, unless
    a resumed checkpoint restored it (``load_state_dict``). ``state_dict``/``load_state_dict`` let `CheckpointSaver`
    and `CheckpointLoader` keep it with the other training state. ``momentum`` is the weight of the current network
    at each update (the average covers about ``1 / momentum`` iterations). Batch-norm statistics are copied.
    """

    def __init__(self, network: torch.nn.Module, momentum: float = 0.002) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        super().__init__(network, momentum=momentum, handle_buffers="copy")
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return self.ema_model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_model.load_state_dict(state)
        self.restored = True

    def attach(self, engine: Engine, name: str = "ema_momentum", **kwargs: Any) -> None:
        # a resumed trainer state already holds the momentum: not a clash worth a warning
        super().attach(engine, name, warn_if_exists=False, **kwargs)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)

    def _start(self, engine: Engine) -> None:
        if not self.restored:
            self.ema_model.load_state_dict(self.model.state_dict())
        engine.remove_event_handler(self._start, Events.ITERATION_STARTED)
