"""SRM calibration-timestep selection: MMD estimator, forward noising, planted best candidate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibration.qconfig import QuantConfig
from calibration.quant_unet import quantize_model
from calibration.srm import (
    SRMConfig,
    evenly_spaced,
    forward_noise,
    mmd2_rbf,
    select_calibration_timestep,
)
from calibration.weight_clipping import calibrate_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def alphas_cumprod(t_count=1000):
    betas = torch.linspace(1e-4, 0.02, t_count)
    return torch.cumprod(1 - betas, 0)


class ConvEps(nn.Module):
    """A time-independent tiny conv 'noise predictor' (quantization error depends on input ranges)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_a = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, sample, timestep):
        h = F.relu(self.conv_a(sample))
        h = F.relu(self.conv_b(h))
        return self.conv_c(h)


class FakeTraj:
    def __init__(self, timesteps, x_t, eps, x0_hat):
        self.timesteps, self.x_t, self.eps, self.x0_hat, self.cond = timesteps, x_t, eps, x0_hat, {}


def planted_traj(qm, amplitudes, steps=12, items=40, seed=0):
    """True clean images x0 have amplitude 1 (+-1 blobs); candidate c's x0_hat is x0 * amplitudes[c]."""
    gen = torch.Generator().manual_seed(seed)
    ab = alphas_cumprod()
    x0 = torch.sign(torch.randn(items, 1, 8, 8, generator=gen))
    ts = torch.linspace(300, 0, steps).round().to(torch.int64)
    noise = torch.randn(steps, items, 1, 8, 8, generator=gen)
    x_t = forward_noise(x0, ts, noise, ab)
    from calibration.group_search import fp_predictions

    eps = fp_predictions(qm, ts, x_t)
    # candidates: one per step; planted: x0_hat at step c is x0 scaled by amplitudes[c]
    x0_hat = torch.stack([x0 * a for a in amplitudes])
    return FakeTraj(ts, x_t, eps, x0_hat), ab


def test_mmd_zero_for_same_distribution_and_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g)
    b = torch.randn(200, 4, generator=g)
    c = torch.randn(200, 4, generator=g) + 1.0
    same, shifted = mmd2_rbf(a, b), mmd2_rbf(a, c)
    assert abs(same) < 0.02
    assert shifted > 0.1 > same


def test_forward_noise_matches_formula():
    ab = alphas_cumprod()
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.zeros(3, 2, 1, 2, 2)
    x = forward_noise(x0, torch.tensor([0, 500, 999]), noise, ab)
    assert torch.allclose(x[:, 0, 0, 0, 0], ab[[0, 500, 999]].sqrt())


def test_evenly_spaced_includes_last():
    assert evenly_spaced(100, 8)[-1] == 99
    assert evenly_spaced(100, 8)[0] == 0
    assert len(evenly_spaced(100, 8)) == 8
    assert evenly_spaced(3, 8) == [0, 1, 2]


def test_srm_picks_planted_candidate():
    amplitudes = [0.2, 0.5, 1.0, 2.0, 4.0]
    qm = quantize_model(ConvEps(), QuantConfig(w_bits=8, a_bits=8, fp_layers=()), num_train_timesteps=1000)
    calibrate_weights(qm, search=False)
    traj, ab = planted_traj(qm, amplitudes + [1.0] * 7)
    cfg = SRMConfig(candidates=[0, 1, 2, 3, 4], eval_steps=6, heldout_items=16, num_groups=2, lambda_mmd=1.0, clip_x0=False, percentile=None)
    rep = select_calibration_timestep(qm, traj, ab, cfg)
    assert [r["step"] for r in rep.rows] == [0, 1, 2, 3, 4]
    mmd = [r["mmd2"] for r in rep.rows]
    assert min(range(5), key=lambda i: mmd[i]) == 2, mmd  # the matching data is closest to the true states
    assert rep.tau_step == 2, rep.table()
    assert rep.oracle_best_index == 2, rep.table()
    assert rep.oracle_gap() == 0.0
    assert "tau*" in rep.table()
    # the MMD term is what makes the choice: empirical risk alone prefers the widest data
    emp = [r["empirical_risk"] for r in rep.rows]
    assert min(range(5), key=lambda i: emp[i]) != 2
    cfg0 = SRMConfig(candidates=[0, 1, 2, 3, 4], eval_steps=6, heldout_items=16, num_groups=2, lambda_mmd=0.0,
                     clip_x0=False, percentile=None)
    assert select_calibration_timestep(qm, traj, ab, cfg0).tau_step != 2

