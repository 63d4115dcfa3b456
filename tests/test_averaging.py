"""Stable weights: the moving average during training starts from the weights training starts from and survives a
resume; the weights-file average (`scripts.tools.average_weights`, soups and WiSE-FT) mixes files as it says."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from ignite.engine import Engine, Events

from scripts.averaging import WeightAverage
from scripts.network import TCMN, load_network_weights
from scripts.tools.average_weights import main as average_weights


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


def save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def test_weights_files_are_mixed_by_their_weights(tmp_path) -> None:
    """Floats are the weighted mean (weights scaled to sum 1), integer buffers come from the first file, and a
    training checkpoint contributes its ``network`` entry."""
    a = net().state_dict()
    b = {k: v + 4 if v.is_floating_point() else v + 7 for k, v in a.items()}
    first = save(a, tmp_path / "a.pt")
    second = save({"network": b, "optimizer": {}}, tmp_path / "checkpoint_final.pt")
    out = average_weights([first, second, "--weights", "3,1", "--output", str(tmp_path / "mix.pt")])
    mixed = torch.load(out)
    assert mixed.keys() == a.keys()
    assert torch.allclose(mixed["0.weight"], a["0.weight"] + 1)  # 0.75 a + 0.25 (a + 4)
    assert torch.equal(mixed["1.num_batches_tracked"], a["1.num_batches_tracked"])
    equal = torch.load(average_weights([first, second, "--output", str(tmp_path / "equal.pt")]))
    assert torch.allclose(equal["1.running_var"], a["1.running_var"] + 2)


def test_shipped_weights_averaged_with_themselves_load_unchanged(tmp_path) -> None:
    """The output is a plain state dict the bundle loads: the shipped weights mixed with themselves are themselves."""
    shipped = REPO / "bundle" / "models" / "model.pt"
    out = average_weights([str(shipped), str(shipped), "--output", str(tmp_path / "same.pt")])
    a, b = torch.load(shipped), torch.load(out)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6 * (1 + a[k].abs().max().item())) for k in a)
    load_network_weights(TCMN("lite", pretrained=False), out)


def test_bad_weights_files_are_refused_in_one_line_and_nothing_is_replaced(tmp_path) -> None:
    a = net().state_dict()
    first = save(a, tmp_path / "a.pt")
    other = save({**a, "2.weight": torch.zeros(1)}, tmp_path / "other.pt")
    output = tmp_path / "out.pt"
    with pytest.raises(SystemExit, match=r"error: .*other\.pt: its keys differ"):
        average_weights([first, other, "--output", str(output)])
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "other.pt"]
    output.write_bytes(b"the user's file")
    with pytest.raises(SystemExit, match="exists; add --overwrite"):
        average_weights([first, first, "--output", str(output)])
    assert output.read_bytes() == b"the user's file"
    with pytest.raises(SystemExit, match="is one of the inputs"):
        average_weights([first, str(output), "--output", str(output), "--overwrite"])
    with pytest.raises(SystemExit, match="--weights: 1 weights for 2 files"):
        average_weights([first, first, "--weights", "1", "--output", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="every weight must be above 0"):
        average_weights([first, first, "--weights", "1,0", "--output", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="not a PyTorch file"):
        average_weights([first, str(output), "--output", str(tmp_path / "x.pt")])
    average_weights([first, first, "--output", str(output), "--overwrite"])
    assert torch.equal(torch.load(output)["0.weight"], a["0.weight"])
