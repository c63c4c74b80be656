"""The CUDA path of calibration (`--device cuda`): trajectories, statistics and the ADP-DM search on the
GPU give the calibration the CPU gives, up to float noise. Runs where torch sees a CUDA GPU and skips
with the reason elsewhere; `tools/cuda_calibration_time.py` times the same path."""

from __future__ import annotations

import copy

import pytest
import torch

from calibration.configs import DataFreeConfig, method_config
from calibration.pipeline import calibrate
from engines.platform import cuda_status
from tiny_models import tiny_unet2d

CUDA_OK, CUDA_WHY = cuda_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA_OK, reason=f"needs a CUDA GPU: {CUDA_WHY}")]

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
         "prediction_type": "epsilon", "clip_sample": False}
TINY_ADPDM = {"groups": 2, "search_iters": 4, "refine_iters": 2, "srm_candidates": 2, "srm_eval_steps": 2,
              "srm_heldout_items": 2, "search_items": 4}


def _both(method: str, options: dict):
    unet = tiny_unet2d()
    data = DataFreeConfig(samples=6, steps=6)
    cpu = calibrate(copy.deepcopy(unet), SCHED, method_config(method, dict(options)), data=data, device="cpu")
    gpu = calibrate(copy.deepcopy(unet), SCHED, method_config(method, dict(options)), data=data, device="cuda")
    return cpu, gpu


def test_uniform_groups_on_cuda_match_the_cpu():
    cpu, gpu = _both("uniform-groups", {"groups": 2, "stat": "minmax"})
    assert gpu.config["calibration"]["device"].startswith("cuda")
    assert torch.equal(cpu.timestep_to_group.cpu(), gpu.timestep_to_group.cpu())
    assert set(cpu.activation_scales) == set(gpu.activation_scales)
    for name, s in cpu.activation_scales.items():
        torch.testing.assert_close(gpu.activation_scales[name].cpu(), s.cpu(), rtol=1e-3, atol=1e-6, msg=name)
    for name, s in cpu.weight_scales.items():
        torch.testing.assert_close(gpu.weight_scales[name].cpu(), s.cpu(), rtol=1e-5, atol=1e-8, msg=name)


def test_adpdm_search_runs_on_cuda():
    """The differentiable search and SRM on the GPU: a valid G-group table and finite, positive scales
    close to the CPU's (the search is iterative, so float noise may move a scale a little)."""
    cpu, gpu = _both("adpdm", TINY_ADPDM)
    assert gpu.num_groups == cpu.num_groups == 2
    assert sorted(set(gpu.timestep_to_group.cpu().tolist())) == [0, 1]
    for name, s in gpu.activation_scales.items():
        s = s.cpu()
        assert torch.isfinite(s).all() and (s > 0).all(), name
        ref = cpu.activation_scales[name].cpu()
        assert float(((s - ref).abs() / ref).median()) < 0.05, name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_sampling_on_cuda(precision):
    """--sampling-precision on the GPU (what it is for): the probe accepts the tiny model, the record says
    what sampling ran in, and the ranges stay within a few percent of FP32 sampling's."""
    unet = tiny_unet2d()
    method = method_config("uniform-groups", {"groups": 2, "stat": "minmax"})
    full = calibrate(copy.deepcopy(unet), SCHED, method, data=DataFreeConfig(samples=6, steps=6), device="cuda")
    half = calibrate(copy.deepcopy(unet), SCHED, method, data=DataFreeConfig(samples=6, steps=6, precision=precision),
                     device="cuda")
    settings = half.config["calibration"]
    assert settings["sampling_precision"] == precision, settings.get("sampling_precision_check")
    assert settings["sampling_precision_check"]["probe_rel_l2_max"] > 0.0
    for name, s in full.activation_scales.items():
        torch.testing.assert_close(half.activation_scales[name].cpu(), s.cpu(), rtol=0.05, atol=1e-6, msg=name)
