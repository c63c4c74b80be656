"""Shared fixtures: tiny random diffusers UNets (seeded, CPU, eval mode) and a DDPM scheduler config.

Builders live in tests/tiny_models.py; these fixtures give each test a fresh model.
"""

from __future__ import annotations

import pytest

from tiny_models import tiny_cond_unet, tiny_unet2d

DDPM_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


@pytest.fixture
def tiny_unet():
    """UNet2DModel: 16x16, 1 channel, (16, 32) channels, one attention down/up block and mid attention."""
    return tiny_unet2d()


@pytest.fixture
def tiny_cond():
    """UNet2DConditionModel: 16x16, 4 channels, cross-attention (dim 24)."""
    return tiny_cond_unet()


@pytest.fixture
def ddpm_config():
    return dict(DDPM_CONFIG)
