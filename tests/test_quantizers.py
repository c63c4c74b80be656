"""Fake quantizers: closed-form numerics, torch.fake_quantize parity, gradients, groups, mixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.observers import ActivationObserver
from calibration.quantizers import (
    MIN_SCALE,
    ActQuantizer,
    WeightQuantizer,
    export_fake_quant_per_channel,
    export_fake_quant_per_tensor,
    fake_quant,
    fake_quant_per_channel,
    qrange,
    scale_from_amax,
)
from calibration.weight_clipping import maxabs_scales, mse_clip_scales
from engines.errors import AdpdmError


def closed_form(x: np.ndarray, s: np.float32, bits: int) -> np.ndarray:
    """numpy reference: clamp(rint(x * float32(1/s)), -2^(b-1), 2^(b-1)-1) * s, all float32."""
    inv = np.float32(1.0) / np.float32(s)
    q = np.rint((x.astype(np.float32) * inv).astype(np.float32))
    return (np.clip(q, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * np.float32(s)).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_fake_quant_equals_closed_form_and_torch(bits):
    g = torch.Generator().manual_seed(bits)
    s = torch.tensor(0.037, dtype=torch.float32)
    x = torch.randn(4096, generator=g) * 2
    # exact half-way points must round half to even, as torch.fake_quantize does
    halves = (torch.arange(-2 ** (bits - 1), 2 ** (bits - 1)).float() + 0.5) * s
    x = torch.cat([x, halves, torch.tensor([0.0, -0.0, 1e6, -1e6])])
    y = fake_quant(x, s, bits)
    assert np.array_equal(y.numpy(), closed_form(x.numpy(), np.float32(s.item()), bits))
    qmin, qmax = qrange(bits)
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), 0, qmin, qmax)
    assert torch.equal(y, ref)
    assert torch.equal(export_fake_quant_per_tensor(x, float(s), bits), y)
    assert torch.equal(export_fake_quant_per_tensor(x, float(s), bits, zero_point="uint8"), y)
    assert y.max() <= qmax * s and y.min() >= qmin * s  # clipped to the grid
    assert qrange(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def test_round_half_to_even():
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, -128.5])
    assert fake_quant(x, s, 8).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 127.0, -128.0]


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_equals_torch(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g)
    s = scale_from_amax(w.abs().amax((1, 2, 3)) * 0.8, bits)
    # exact half-way points per channel
    w[:, 0, 0, 0] = s * 2.5
    y = fake_quant_per_channel(w, s, bits)
    qmin, qmax = qrange(bits)
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(16, dtype=torch.int32), 0, qmin, qmax)
    assert torch.equal(y, ref)
    assert torch.equal(export_fake_quant_per_channel(w, s, bits), y)


def test_scale_floor_and_amax():
    assert scale_from_amax(127.0, 8).item() == pytest.approx(1.0)
    assert scale_from_amax(0.0, 8).item() == pytest.approx(MIN_SCALE)
    q = ActQuantizer(8, 2)
    q.set_amax(torch.tensor([0.0, 12.7]))
    assert (q.scale > 0).all() and q.scale[1].item() == pytest.approx(0.1)


def test_gradients_lsq_and_ste():
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.03, 0.26, -0.44, 20.0, -20.0], requires_grad=True)
    y = fake_quant(x, s, 8)
    y.sum().backward()
    v = (x.detach() * (1.0 / s.detach())).numpy()
    expect_s = np.where(v > 127, 127.0, np.where(v < -128, -128.0, np.rint(v) - v))
    assert np.allclose(s.grad.item(), expect_s.sum(), atol=1e-5)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # straight through inside, zero where clipped


def test_gradients_reach_learnable_log_scales():
    q = ActQuantizer(4, 3)
    q.set_scale(torch.tensor([0.05, 0.1, 0.2]))
    p = q.make_learnable()
    q._state.set_groups(torch.tensor([1]))
    x = torch.randn(2, 8, 4, 4)
    loss = ((q(x) - x) ** 2).sum()
    loss.backward()
    assert p.grad is not None and p.grad[1] != 0 and p.grad[0] == 0 and p.grad[2] == 0
    before = q.effective_scale().detach().clone()
    q.freeze()
    assert q.log_scale is None and torch.allclose(q.scale, before)


def test_per_item_groups_and_head_folding():
    q = ActQuantizer(8, 2)
    q.set_scale(torch.tensor([0.01, 0.5]))
    x = torch.randn(2, 3, 5) * 3
    q._state.set_groups(torch.tensor([0, 1]))
    y = q(x)
    assert torch.equal(y[0], fake_quant(x[0], q.scale[0], 8))
    assert torch.equal(y[1], fake_quant(x[1], q.scale[1], 8))
    # leading dim B*heads (item-major, as diffusers folds heads into the batch)
    xh = torch.randn(2 * 4, 6, 3)
    yh = q(xh)
    assert torch.equal(yh[:4], fake_quant(xh[:4], q.scale[0], 8))
    assert torch.equal(yh[4:], fake_quant(xh[4:], q.scale[1], 8))
    with pytest.raises(AdpdmError, match="leading dimension"):
        q(torch.randn(3, 2))
    # one group id for the whole batch
    q._state.set_groups(torch.tensor([1]))
    assert torch.equal(q(x), fake_quant(x, q.scale[1], 8))
    with pytest.raises(AdpdmError):
        q._state.set_groups(torch.tensor([2]))


def test_no_active_group_is_an_error_with_several_groups():
    q = ActQuantizer(8, 2)
    with pytest.raises(AdpdmError, match="no active group"):
        q(torch.randn(2, 2))
    single = ActQuantizer(8, 1)
    single.set_scale(0.1)
    x = torch.randn(4, 4)
    assert torch.equal(single(x), fake_quant(x, torch.tensor(0.1), 8))


def test_relaxed_mixture():
    q = ActQuantizer(6, 3)
    q.set_scale(torch.tensor([0.02, 0.1, 0.3]))
    x = torch.randn(2, 4, 3, 3)
    st = q._state
    st.mixture = torch.tensor([0.2, 0.5, 0.3])
    expect = sum(w * fake_quant(x, s, 6) for w, s in zip([0.2, 0.5, 0.3], q.scale))
    assert torch.allclose(q(x), expect, atol=1e-6)
    pi = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # per item, one-hot: equals hard groups
    st.mixture = pi
    y = q(x)
    assert torch.allclose(y[0], fake_quant(x[0], q.scale[0], 6)) and torch.allclose(y[1], fake_quant(x[1], q.scale[2], 6))
    # gradients reach both the mixture logits and the log-scales
    logits = torch.zeros(2, 3, requires_grad=True)
    p = q.make_learnable()
    st.mixture = logits.softmax(-1)
    ((q(x) - x) ** 2).sum().backward()
    assert logits.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def test_weight_quantizer_and_clipping():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)
    w[:, 0] = 8.0  # outliers: clipping below max-abs must win at 4 bits
    wq = WeightQuantizer(4, 8)
    s_mse = mse_clip_scales(w, 4)
    s_max = maxabs_scales(w, 4)
    assert (s_mse > 0).all() and (s_mse <= s_max + 1e-12).all()
    err = lambda s: ((fake_quant_per_channel(w, s, 4) - w) ** 2).sum(1)  # noqa: E731
    assert (err(s_mse) <= err(s_max) + 1e-6).all()
    assert err(s_mse).sum() < err(s_max).sum()
    wq.set_scale(s_mse)
    assert torch.equal(wq(w), fake_quant_per_channel(w, s_mse, 4))
    wq._state.weight_enabled = False
    assert torch.equal(wq(w), w)


def test_observer_splits_mixed_batches_and_percentiles():
    q = ActQuantizer(8, 2)
    q.qname = "q"
    obs = ActivationObserver(2, histogram=True, bins=1024)
    st = q._state
    st.observer = obs
    x = torch.zeros(2, 1000)
    x[0] = torch.linspace(-1, 1, 1000)
    x[1] = torch.linspace(-10, 10, 1000)
    st.set_groups(torch.tensor([1, 0]))
    q(x)
    amax = obs.amax()["q"]
    assert amax.tolist() == pytest.approx([10.0, 1.0])
    p = obs.percentile_amax(50.0)["q"]
    assert p[0].item() == pytest.approx(5.0, rel=0.02) and p[1].item() == pytest.approx(0.5, rel=0.02)
    # growing ranges merge histogram bins exactly
    st.set_groups(torch.tensor([1]))
    q(torch.full((1, 10), 40.0))
    assert obs.amax()["q"][1].item() == 40.0
    assert obs.percentile_amax(100.0)["q"][1].item() == pytest.approx(40.0)
    with pytest.raises(AdpdmError):
        ActivationObserver(2).percentile_amax(99.0)


def test_percentile_with_subsampled_histograms():
    q = ActQuantizer(8, 1)
    q.qname = "q"
    full = ActivationObserver(1, histogram=True, bins=1024, max_samples=1 << 30)
    sub = ActivationObserver(1, histogram=True, bins=1024, max_samples=5000)
    g = torch.Generator().manual_seed(0)
    for k in range(5):
        x = torch.randn(50_000, generator=g) * (k + 1)
        full(q, x)
        sub(q, x)
    for p in (50.0, 99.0):
        a, b = full.percentile_amax(p)["q"].item(), sub.percentile_amax(p)["q"].item()
        assert b == pytest.approx(a, rel=0.05)
    assert sub.amax()["q"].item() == full.amax()["q"].item()  # the max is always exact


def test_observer_merge_groups_is_exact():
    q = ActQuantizer(8, 4)
    q.qname = "q"
    per_step = ActivationObserver(4, histogram=True, bins=256)
    direct = ActivationObserver(2, histogram=True, bins=256)
    g = torch.Generator().manual_seed(0)
    st = q._state
    for step, scale in enumerate([0.3, 5.0, 1.0, 40.0]):
        x = torch.randn(3, 500, generator=g) * scale
        st.set_groups(torch.tensor([step]))
        per_step(q, x)
        direct._add("q", step // 2, x)
    merged = per_step.merge_groups([0, 0, 1, 1], 2)
    assert torch.equal(merged.amax()["q"], direct.amax()["q"])
    assert torch.allclose(merged.percentile_amax(90.0)["q"], direct.percentile_amax(90.0)["q"])
    assert torch.allclose(merged.percentile_amax(99.9)["q"], direct.percentile_amax(99.9)["q"])
