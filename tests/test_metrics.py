"""Metrics: noise relative L2, PSNR vs FP, Frechet distance hooks."""

from __future__ import annotations

import math

import pytest
import torch

from calibration.metrics import (
    PSNR_CAP_DB, evaluate, noise_rel_l2, off_range_items, per_sample_summary, psnr, sample_like, trajectory_report,
)
from calibration.qconfig import QuantConfig
from calibration.quant_unet import activation_quantizers, fp_mode, quantize_model
from calibration.trajectories import generate_trajectories


def test_psnr():
    a = torch.zeros(2, 1, 4, 4)
    b = a + 0.02
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.0004))
    assert psnr(a, a) == PSNR_CAP_DB
    assert psnr(a, a + 5) == psnr(a, a + 1)  # clamped to [-1, 1]


def test_fp_model_has_zero_error_and_same_samples(tiny_unet, ddpm_config):
    held = generate_trajectories(tiny_unet, ddpm_config, num_samples=3, num_steps=4, seed=11)
    q = quantize_model(tiny_unet, QuantConfig())
    with fp_mode(q):
        nr = noise_rel_l2(q, held)
        imgs = sample_like(q, ddpm_config, held)
    assert nr["timesteps"] == held.timesteps.tolist()
    assert max(nr["rel_l2"]) < 1e-5
    assert torch.allclose(imgs, held.final, atol=1e-5)


def test_evaluate_keys_and_fd(tiny_unet, ddpm_config):
    held = generate_trajectories(tiny_unet, ddpm_config, num_samples=4, num_steps=3, seed=5)
    q = quantize_model(tiny_unet, QuantConfig(a_bits=4))
    for aq in activation_quantizers(q).values():
        aq.set_scale(0.05)

    def features(x):  # any feature extractor: here pooled pixel statistics
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x.amax((1, 2, 3))], 1)

    real = (torch.zeros(3).numpy(), torch.eye(3).numpy())
    m = evaluate(q, ddpm_config, held, feature_fn=features, real_stats=real)
    for key in ("noise_rel_l2", "psnr_vs_fp_db", "fd", "fd_fp", "fd_delta", "noise_rel_l2_per_timestep"):
        assert key in m
    assert m["noise_rel_l2"] > 0.01 and m["psnr_vs_fp_db"] < PSNR_CAP_DB
    assert m["fd_delta"] == pytest.approx(m["fd"] - m["fd_fp"])
    assert len(m["noise_rel_l2_per_timestep"]) == 3
    m2 = evaluate(q, ddpm_config, held)
    assert m2["fd"] is None and m2["noise_rel_l2"] == pytest.approx(m["noise_rel_l2"])


def test_per_sample_rel_l2_is_robust_to_one_bad_item(tiny_unet, ddpm_config):
    """Per item, the mean over timesteps of its own ratio; with a single item it is the pooled figure.
    One item whose error is 100x the others' moves the pooled value and the max, never the median."""
    held = generate_trajectories(tiny_unet, ddpm_config, num_samples=5, num_steps=3, seed=5)
    q = quantize_model(tiny_unet, QuantConfig(a_bits=6))
    for aq in activation_quantizers(q).values():
        aq.set_scale(0.05)
    nr = noise_rel_l2(q, held, batch_size=2)
    assert len(nr["per_sample"]) == 5 and min(nr["per_sample"]) > 0
    single = generate_trajectories(tiny_unet, ddpm_config, num_samples=1, num_steps=3, seed=5)
    s1 = noise_rel_l2(q, single)
    assert s1["per_sample"][0] == pytest.approx(s1["mean"], rel=1e-6)

    values = [0.01, 0.011, 0.012, 0.009, 1.0]
    summ = per_sample_summary(values, seeds=[10, 11, 12, 13, 14])
    assert summ["noise_rel_l2_median"] == pytest.approx(0.011) and summ["noise_rel_l2_max"] == 1.0
    assert summ["noise_rel_l2_max_seed"] == 14 and 0.012 < summ["noise_rel_l2_p90"] < 1.0


def test_off_range_trajectories_are_found_by_seed(tiny_unet, ddpm_config):
    held = generate_trajectories(tiny_unet, ddpm_config, num_samples=4, num_steps=5, seed=40)
    held.x_t = held.x_t.clamp(-3, 3)  # a random tiny UNet's own trajectories: bring them in range
    assert off_range_items(held, {**ddpm_config, "clip_sample": True}) == []
    held.x_t[3, 2, 0, 1, 1] = 9.0  # item 2 leaves the range at step 3 (|x| 9 > 1 + 6 sigma)
    rep = trajectory_report(held, {**ddpm_config, "clip_sample": True})
    assert rep == {"off_range_count": 1, "off_range_seeds": [42]}
