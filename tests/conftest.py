"""Shared fixtures: tiny random diffusers UNets (seeded, CPU, eval mode) and a DDPM scheduler config.

Builders live in tests/tiny_models.py; these fixtures give each test a fresh model.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_cond_unet, tiny_unet2d

from adpdm_export.model_loading import DEFAULT_SCHEDULER_CONFIG as DDPM_CONFIG


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 cores shared by many processes its thread pool spins against them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
