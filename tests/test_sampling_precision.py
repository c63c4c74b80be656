"""Sampling the calibration trajectories in bf16 / fp16 (DataFreeConfig.precision): the probe that decides
whether it is safe on a model, the fallback to FP32, the cache key and what the calibration records.
bf16 and fp16 autocast run on the CPU too, so all of this runs here; the GPU side is in
tests/test_cuda_calibration.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from calibration import sampling_precision as sp
from calibration.configs import DataFreeConfig, method_config
from calibration.pipeline import calibrate
from calibration.trajectories import generate_trajectories, unet_sample_shape
from engines.errors import AdpdmError
from tiny_models import tiny_cond_unet, tiny_unet2d

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
         "prediction_type": "epsilon", "clip_sample": False}


class BreaksInHalf(nn.Module):
    """A UNet stand-in whose half-precision forward overflows (as an FP16 GroupNorm input past 256 would)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, sample, timestep, **_):
        out = self.conv(sample)
        if out.dtype != torch.float32:  # under autocast
            out = out * float("inf")
        return out


def test_config_checks_and_keeps_fp32_plans_unchanged():
    assert "precision" not in DataFreeConfig().to_dict()
    assert DataFreeConfig(precision="bf16").to_dict()["precision"] == "bf16"
    with pytest.raises(AdpdmError, match="precision must be one of fp32, fp16, bf16, got 'int8'"):
        DataFreeConfig(precision="int8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_probe_accepts_a_half_forward_close_to_fp32(precision):
    unet = tiny_unet2d()
    check = sp.check_precision(unet, precision, 1000, unet_sample_shape(unet))
    assert check.used == precision
    assert 0.0 < check.probe_rel_l2_max < sp.PROBE_TOLERANCE  # half precision is not exact, and close
    assert f"sampling in {precision}" in check.reason


def test_probe_falls_back_to_fp32_past_the_tolerance(monkeypatch):
    monkeypatch.setattr(sp, "PROBE_TOLERANCE", 1e-9)
    unet = tiny_unet2d()
    check = sp.check_precision(unet, "bf16", 1000, unet_sample_shape(unet))
    assert (check.requested, check.used) == ("bf16", "fp32")
    assert "off FP32 by" in check.reason and "sampling in fp32" in check.reason


def test_probe_falls_back_on_non_finite_outputs():
    check = sp.check_precision(BreaksInHalf(), "bf16", 1000, (3, 8, 8))
    assert check.used == "fp32" and check.probe_rel_l2_max is None
    assert "non-finite" in check.reason


def test_half_trajectories_are_their_own_cache_entry_and_stay_fp32(tmp_path):
    unet = tiny_unet2d()
    kw = dict(num_samples=3, num_steps=4, cache_dir=tmp_path)
    full = generate_trajectories(unet, SCHED, **kw)
    half = generate_trajectories(unet, SCHED, precision="bf16", **kw)
    assert not half.from_cache  # not the FP32 set from the cache
    assert half.settings["precision"] == "bf16" and "precision" not in full.settings
    assert half.x_t.dtype == torch.float32 and half.eps.dtype == torch.float32
    rel = float((half.eps - full.eps).norm() / full.eps.norm())
    assert 0.0 < rel < 0.05
    assert torch.equal(half.x_t[0], full.x_t[0])  # the same starting noise
    again = generate_trajectories(unet, SCHED, precision="bf16", **kw)
    assert again.from_cache and torch.equal(again.eps, half.eps)


def test_calibration_records_what_it_sampled_in():
    method = method_config("uniform-groups", {"groups": 2, "stat": "minmax"})
    lines: list[str] = []
    res = calibrate(tiny_unet2d(), SCHED, method, data=DataFreeConfig(samples=3, steps=4, precision="bf16"),
                    log=lines.append)
    settings = res.config["calibration"]
    assert settings["sampling_precision"] == "bf16"
    assert settings["sampling_precision_check"]["used"] == "bf16"
    assert settings["trajectory_key"]["precision"] == "bf16"
    assert any("sampling in bf16" in line for line in lines)
    fp32 = calibrate(tiny_unet2d(), SCHED, method, data=DataFreeConfig(samples=3, steps=4))
    assert fp32.config["calibration"]["sampling_precision"] == "fp32"
    assert "sampling_precision_check" not in fp32.config["calibration"]
    for name, s in fp32.activation_scales.items():  # half sampling moves the ranges a little, not far
        torch.testing.assert_close(res.activation_scales[name], s, rtol=0.05, atol=1e-6, msg=name)


def test_a_refused_precision_samples_in_fp32(monkeypatch):
    monkeypatch.setattr(sp, "PROBE_TOLERANCE", 1e-9)
    method = method_config("minmax", {})
    res = calibrate(tiny_unet2d(), SCHED, method, data=DataFreeConfig(samples=2, steps=3, precision="bf16"))
    settings = res.config["calibration"]
    assert settings["sampling_precision"] == "fp32"
    assert settings["sampling_precision_check"]["used"] == "fp32"
    assert "precision" not in settings["trajectory_key"]


def test_guided_probe_sees_both_halves(monkeypatch):
    """With guidance the probe feeds the unconditional and the conditional inputs, as the sampler does."""
    seen = []
    real = sp.check_precision

    def spy(unet, precision, t_count, shape, *, seed=0, cond=None):
        seen.append(cond)
        return real(unet, precision, t_count, shape, seed=seed, cond=cond)

    monkeypatch.setattr("calibration.pipeline.check_precision", spy)
    unet = tiny_cond_unet()
    dim = unet.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.ones(1, 4, dim)}
    uncond = {"encoder_hidden_states": torch.zeros(1, 4, dim)}
    res = calibrate(unet, SCHED, method_config("minmax", {}),
                    data=DataFreeConfig(samples=2, steps=3, guidance_scale=3.0, precision="bf16"),
                    cond=cond, uncond=uncond)
    probe = seen[0]["encoder_hidden_states"]
    assert probe.shape[0] == sp.PROBE_ITEMS
    assert torch.equal(probe[0::2], torch.zeros_like(probe[0::2])) and torch.equal(probe[1::2], torch.ones_like(probe[1::2]))
    assert res.config["calibration"]["sampling_precision"] == "bf16"


@pytest.mark.parametrize("command", ["calibrate", "build-engine"])
def test_cli_refuses_an_unknown_sampling_precision_before_any_work(command, tmp_path, capsys):
    from adpdm_export.cli import main

    capsys.readouterr()
    rc = main([command, "reference", "--out", str(tmp_path / "out"), "--sampling-precision", "fp8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["error: precision must be one of fp32, fp16, bf16, got 'fp8'"], err
    assert not (tmp_path / "out").exists()


def test_cli_calibrates_in_bf16_and_records_it(tmp_path, capsys):
    from adpdm_export.cli import main

    rc = main(["calibrate", "reference", "--out", str(tmp_path / "c"), "--method", "minmax", "--calib-samples", "2",
               "--calib-steps", "3", "--sampling-precision", "bf16", "--no-cache", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "sampling in bf16" in err
    settings = json.loads((tmp_path / "c" / "calibration.json").read_text())["config"]["calibration"]
    assert settings["sampling_precision"] == "bf16"
