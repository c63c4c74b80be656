"""Calibrations for the QDQ export tests: `quick_result` (max-abs scales of a few random inputs per
uniform group, no learning) and the input specs of the two tiny UNets (`U2D`, `U2C`).

Used by the export, parity, onnxruntime-target and lint/inspect tests; the shared exports built
from them are the `u2d_export` / `u2c_export` fixtures in conftest.py.
"""

from __future__ import annotations

import torch

from adpdm_export.onnx_export import example_inputs

T = 1000
U2D = dict(sample_shape=(1, 16, 16), conditioning={})
U2C = dict(sample_shape=(4, 16, 16), conditioning={"encoder_hidden_states": {"dim": 24}})


def quick_result(unet, sample_shape, conditioning, groups=2, seed=0, **cfg):
    """A CalibrationResult from max-abs statistics of a few random inputs per group (uniform groups)."""
    from calibration.baselines import set_activation_scales
    from calibration.timestep_tables import uniform_table
    from calibration.observers import ActivationObserver
    from calibration.qconfig import QuantConfig
    from calibration.quant_unet import observe_mode, quantize_model
    from calibration.result import result_from_model

    qm = quantize_model(unet, QuantConfig(**cfg), table=uniform_table(groups, T))
    obs = ActivationObserver(groups)
    with observe_mode(qm, obs), torch.no_grad():
        for g in range(groups):
            inp = example_inputs(sample_shape, conditioning, batch=4, seed=seed + g, num_train_timesteps=T)
            lo, hi = g * T // groups, (g + 1) * T // groups
            inp["timestep"] = torch.randint(lo, hi, (4,), generator=torch.Generator().manual_seed(g))
            v = list(inp.values())
            qm(v[0], v[1], **dict(zip(list(inp)[2:], v[2:])))
    set_activation_scales(qm, obs.amax())
    return result_from_model(qm, "test-minmax", {})
