"""The moving average of the weights starts from the weights training starts from and survives a resume."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from scripts.averaging import WeightAverage


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def trainer(model: torch.nn.Module, step: float) -> Engine:
    def update(engine: Engine, batch: object) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)

    return Engine(update)


def test_average_starts_from_weights_loaded_after_it_was_built() -> None:
    model = net()
    average = WeightAverage(model, momentum=0.5)
    loaded = {k: v + 10 for k, v in model.state_dict().items()}  # what CheckpointLoader does at STARTED
    engine = trainer(model, 1.0)
    engine.add_event_handler(Events.STARTED, lambda e: model.load_state_dict(loaded))
    average.attach(engine)
    engine.run([0], max_epochs=1)  # one iteration: ema = 0.5 * loaded + 0.5 * (loaded + 1)
    w0 = loaded["0.weight"]
    assert torch.allclose(average.ema_model[0].weight, w0 + 0.5)
    assert torch.allclose(model[0].weight, w0 + 1)


def test_restored_average_is_kept_and_state_round_trips() -> None:
    model = net()
    average = WeightAverage(model, momentum=0.25)
    saved = {k: torch.full_like(v, 3.0) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    average.load_state_dict(saved)
    assert average.restored
    engine = trainer(model, 0.0)
    average.attach(engine)
    engine.run([0], max_epochs=1)
    expected = 0.75 * 3.0 + 0.25 * model[0].weight
    assert torch.allclose(average.state_dict()["0.weight"], expected)


def test_momentum_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="momentum"):
        WeightAverage(net(), momentum=0.0)
