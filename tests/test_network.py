"""Network shapes, the memory read against hand-computed attention, the memory bank, and the contrastive loss.

Learning on a fixed clip is tested with the training step, in test_training.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from scripts import memory
from scripts.losses import TemporalContrastiveLoss, pool_embeddings
from scripts.network import TCMN, KeyEncoderLite, aggregate, lite0_state_dict


def test_lite0_checkpoint_loads_strictly() -> None:
    state = lite0_state_dict()
    assert len(state) == 296
    KeyEncoderLite(pretrained=True)  # strict load inside; raises on any missing or unexpected key


@pytest.mark.parametrize("variant", ["lite", "full"])
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
    out = memory.read(mk, mv, q)
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
    torch.testing.assert_close(memory.read(mk, mv, q, top_k=20), memory.read(mk, mv, q, top_k=None))
    torch.testing.assert_close(memory.read(mk, mv, q, top_k=50), memory.read(mk, mv, q))


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
    torch.testing.assert_close(memory.read(mk, mv, q, top_k=4), expected)
