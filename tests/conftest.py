"""Shared fixtures: tiny random diffusers UNets (seeded, CPU, eval mode), a DDPM scheduler config,
and the QDQ exports of the tiny UNets that the export and parity tests share.

Builders live in tests/tiny_models.py and tests/qdq_fixtures.py; these fixtures give each test a
fresh model (the exports are built once per session and only read).
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


def _export_tiny(tmp_path_factory, name: str, make_unet, spec: dict, **kw):
    """(unet, result, QdqExport) of a tiny UNet quick-calibrated with 2 groups, built on one torch thread."""
    from adpdm_export.qdq_export import export_qdq
    from qdq_fixtures import quick_result

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet = make_unet()
        result = quick_result(unet, **spec)
        exp = export_qdq(unet, result, tmp_path_factory.mktemp(name), **kw, **spec)
    finally:
        torch.set_num_threads(n)
    return unet, result, exp


@pytest.fixture(scope="session")
def u2d_export(tmp_path_factory):
    """The UNet2DModel exported for both targets with every check (parity, lint, fusion); the TensorRT
    target in FP32 (the FP16 default: tests/test_high_precision.py)."""
    from qdq_fixtures import U2D

    return _export_tiny(tmp_path_factory, "qdq-u2d", tiny_unet2d, U2D, target="both", high_precision="fp32")


@pytest.fixture(scope="session")
def u2c_export(tmp_path_factory):
    """The UNet2DConditionModel exported for the TensorRT target (parity and lint, no fusion counts)."""
    from qdq_fixtures import U2C

    return _export_tiny(tmp_path_factory, "qdq-u2c", tiny_cond_unet, U2C, target="trt", fusion=False, high_precision="fp32")
