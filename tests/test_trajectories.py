"""Data-free trajectories: shapes, seeding, conditions, on-disk cache (reuse, never stale)."""

from __future__ import annotations

import pytest
import torch

from calibration.trajectories import (
    expand_cond,
    generate_trajectories,
    heldout_seed,
    load_trajectories,
)
from engines.errors import AdpdmError


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and counts forward calls (to prove the cache skips sampling)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls = 0
        self.config = unet.config

    def forward(self, *a, **k):
        self.calls += 1
        return self.unet(*a, **k)


def test_shapes_and_consistency(tiny_unet, ddpm_config):
    ts = generate_trajectories(tiny_unet, ddpm_config, num_samples=3, num_steps=5, seed=7, batch_size=2)
    assert ts.x_t.shape == ts.eps.shape == ts.x0_hat.shape == (5, 3, 1, 16, 16)
    assert ts.timesteps.tolist() == sorted(ts.timesteps.tolist(), reverse=True) and ts.num_steps == 5
    assert ts.final.shape == (3, 1, 16, 16) and ts.noise.shape == (3, 1, 16, 16)
    assert torch.allclose(ts.x_t[0], ts.noise)  # DDIM: init_noise_sigma 1, scale_model_input identity
    # x0_hat is the epsilon-parameterised clean image of each step
    from diffusers import DDIMScheduler

    abar = DDIMScheduler.from_config(ddpm_config).alphas_cumprod
    i, t = 2, int(ts.timesteps[2])
    x0 = (ts.x_t[i] - (1 - abar[t]).sqrt() * ts.eps[i]) / abar[t].sqrt()
    assert torch.allclose(x0, ts.x0_hat[i], atol=1e-5)
    # eps really is the FP model's prediction at that input
    with torch.no_grad():
        e = tiny_unet(ts.x_t[i], torch.full((3,), t)).sample
    assert torch.allclose(e, ts.eps[i], atol=1e-5)


def test_seed_per_item_independent_of_batch(tiny_unet, ddpm_config):
    a = generate_trajectories(tiny_unet, ddpm_config, num_samples=2, num_steps=2, seed=3)
    b = generate_trajectories(tiny_unet, ddpm_config, num_samples=3, num_steps=2, seed=3, batch_size=1)
    assert torch.equal(a.noise, b.noise[:2])
    assert torch.allclose(a.final, b.final[:2], atol=1e-5)
    h = generate_trajectories(tiny_unet, ddpm_config, num_samples=2, num_steps=2, seed=heldout_seed(3))
    assert not torch.allclose(h.noise, a.noise)
    assert heldout_seed(3) > 3 + 10_000


def test_cache_reused_and_never_stale(tiny_unet, ddpm_config, tmp_path):
    m = CountingUNet(tiny_unet)
    kw = dict(num_samples=2, num_steps=3, seed=0, cache_dir=tmp_path)
    a = generate_trajectories(m, ddpm_config, **kw)
    calls = m.calls
    assert calls == 3 and not a.from_cache
    b = generate_trajectories(m, ddpm_config, **kw)
    assert m.calls == calls and b.from_cache
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.final, b.final)
    # any setting change is another key: sampled again
    generate_trajectories(m, ddpm_config, **{**kw, "num_steps": 4})
    assert m.calls == calls + 4
    generate_trajectories(m, {**ddpm_config, "beta_end": 0.03}, **kw)
    assert m.calls == calls + 7
    # another model (hash) is another key
    with torch.no_grad():
        tiny_unet.conv_out.bias.add_(1.0)
    generate_trajectories(m, ddpm_config, **kw)
    assert m.calls == calls + 10
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    # the same weights under another config (another model) are another key too
    m.config = type(m.config)({**m.config, "norm_eps": float(m.config["norm_eps"]) * 10})
    generate_trajectories(m, ddpm_config, **kw)
    assert m.calls == calls + 13


def test_corrupt_cache_regenerated(tiny_unet, ddpm_config, tmp_path):
    kw = dict(num_samples=2, num_steps=2, cache_dir=tmp_path)
    generate_trajectories(tiny_unet, ddpm_config, **kw)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    assert load_trajectories(path) is None
    with pytest.warns(UserWarning, match="unreadable"):
        again = generate_trajectories(tiny_unet, ddpm_config, **kw)
    assert not again.from_cache
    assert load_trajectories(path) is not None


def test_conditions(tiny_cond, ddpm_config):
    c = expand_cond({"class_labels": torch.tensor([3, 5])}, 5)
    assert c["class_labels"].tolist() == [3, 5, 3, 5, 3]
    emb = torch.randn(2, 3, 24)
    ts = generate_trajectories(tiny_cond, ddpm_config, num_samples=3, num_steps=2,
                               cond={"encoder_hidden_states": emb})
    assert torch.equal(ts.cond["encoder_hidden_states"][2], emb[0])
    assert ts.x_t.shape == (2, 3, 4, 16, 16)
    with pytest.raises(AdpdmError, match="empty"):
        expand_cond({"class_labels": torch.tensor([], dtype=torch.long)}, 2)


def test_bad_settings(tiny_unet, ddpm_config):
    with pytest.raises(AdpdmError):
        generate_trajectories(tiny_unet, ddpm_config, num_samples=0)
    with pytest.raises(AdpdmError):
        generate_trajectories(tiny_unet, ddpm_config, num_steps=0)
