"""The sampling loop: same seed, same images through PyTorch and onnxruntime."""

import pytest
import torch

from adpdm_export.model_loading import load_model
from adpdm_export.sampling import generate, predictor_for
from tiny_models import save_unet_folder, tiny_cond_unet, tiny_unet2d

# Documented in README ("Backends agree"): FP32 onnxruntime and PyTorch differ by ~1e-6
# (relative) per step; the DDIM update divides by sqrt(alpha_bar), which is ~0.006 at
# t = 999, so early differences grow. Random tiny UNets (large, noisy outputs) end within
# 1e-3 max abs on the [-1, 1] scale (2.4e-5 measured, 40x margin); the trained reference model
# much closer (test below).
IMAGE_TOL = 1e-3


@pytest.mark.parametrize("make", [tiny_unet2d, tiny_cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_torch_and_ort_give_the_same_images(tmp_path, monkeypatch, make):
    monkeypatch.setenv("ADPDM_CACHE_DIR", str(tmp_path / "cache"))
    m = load_model(save_unet_folder(make(), tmp_path / "u"))
    runs = {
        b: generate(predictor_for(m, b), m.scheduler_config, m.sample_shape, 3, 20, seed=5, cond=m.default_condition(3)).images
        for b in ("torch", "ort")
    }
    assert torch.isfinite(runs["torch"]).all()
    assert (runs["torch"] - runs["ort"]).abs().max().item() < IMAGE_TOL
    # the FP graph is cached by model hash: a second predictor reuses it
    graphs = list((tmp_path / "cache" / "fp-graphs").glob("*/unet.onnx"))
    assert len(graphs) == 1
    predictor_for(m, "ort")
    assert list((tmp_path / "cache" / "fp-graphs").glob("*/unet.onnx")) == graphs


def test_seed_controls_the_images(tmp_path):
    m = load_model(save_unet_folder(tiny_unet2d(), tmp_path / "u"))
    p = predictor_for(m, "torch")
    a = generate(p, m.scheduler_config, m.sample_shape, 2, 5, seed=1).images
    b = generate(p, m.scheduler_config, m.sample_shape, 2, 5, seed=1).images
    c = generate(p, m.scheduler_config, m.sample_shape, 2, 5, seed=2).images
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpmsolver"])
def test_other_schedulers_run_and_are_reproducible(tmp_path, scheduler):
    m = load_model(save_unet_folder(tiny_unet2d(), tmp_path / "u"))
    p = predictor_for(m, "torch")
    a = generate(p, m.scheduler_config, m.sample_shape, 2, 6, seed=3, scheduler=scheduler).images
    b = generate(p, m.scheduler_config, m.sample_shape, 2, 6, seed=3, scheduler=scheduler).images
    assert torch.isfinite(a).all() and torch.equal(a, b)


REFERENCE_IMAGE_TOL = 1e-4  # measured 1.1e-5 max abs (DDIM 50, 8 samples); see docs/reference-model.md


@pytest.mark.slow
def test_reference_model_same_images_through_torch_and_ort(tmp_path, monkeypatch):
    monkeypatch.setenv("ADPDM_CACHE_DIR", str(tmp_path / "cache"))
    m = load_model("reference")
    runs = {
        b: generate(predictor_for(m, b), m.scheduler_config, m.sample_shape, 8, 50, seed=0).images
        for b in ("torch", "ort")
    }
    assert (runs["torch"] - runs["ort"]).abs().max().item() < REFERENCE_IMAGE_TOL


def _ddim(clip: bool):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip)


def test_clipped_x0_gives_a_consistent_ddim_step():
    """Where DDIM clips x0, the loop re-derives eps from the clipped x0 (use_clipped_model_output): a
    predictor whose x0 is far out of range keeps x_t bounded, while diffusers' default step (raw eps
    beside the clipped x0) lets it grow. Without clipping, the loop is diffusers' default step."""
    from engines.sampler import initial_noise, sample, scheduler_step_kwargs

    assert scheduler_step_kwargs(_ddim(True))["use_clipped_model_output"] is True
    assert "use_clipped_model_output" not in scheduler_step_kwargs(_ddim(False))

    def predictor(x, t, **cond):  # eps overshooting x: the implied x0 has x's opposite sign, out of range
        return 1.5 * x

    noise = initial_noise(4, (1, 8, 8), seed=3)
    ours = sample(predictor, _ddim(True), noise, 100, keep_trajectory=True).trajectory.x_t.abs().max()

    raw = _ddim(True)  # diffusers' default: the same loop with use_clipped_model_output=False
    raw_step = raw.step
    raw.step = lambda *a, **k: raw_step(*a, **{**k, "use_clipped_model_output": False})
    theirs = sample(predictor, raw, noise, 100, keep_trajectory=True).trajectory.x_t.abs().max()
    assert ours < 5 < theirs
