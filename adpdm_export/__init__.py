"""Turning diffusion UNets into ADP-DM INT8 builds: `import adpdm_export as adpdm`.

The whole job from Python (docs/python-api.md):

    model = adpdm.load_model("reference")
    result = adpdm.calibrate(model, adpdm.ADPDMConfig(groups=4), quant=adpdm.QuantConfig(w_bits=8, a_bits=8))
    manifest = adpdm.export(model, result, "build")
    images = adpdm.sample(adpdm.Runner("build"), n=16, steps=50, seed=0)

Names are loaded on first use, so `import adpdm_export` (and the CLI) stays quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the job
    "load_model": "adpdm_export.api",
    "calibrate": "adpdm_export.api",
    "export": "adpdm_export.api",
    "build_engines": "adpdm_export.api",
    "build_engine": "adpdm_export.api",
    "sample": "adpdm_export.api",
    "Runner": "adpdm_export.api",
    # values
    "LoadedModel": "adpdm_export.model_loading",
    "CalibrationResult": "calibration.result",
    "Manifest": "engines.manifest",
    "BuildSummary": "adpdm_export.build_pipeline",
    "TrajectorySet": "calibration.trajectories",
    "AdpdmError": "engines.errors",
    # configs: one per method, what is quantized, the data-free data
    "ADPDMConfig": "calibration.configs",
    "MinMaxConfig": "calibration.configs",
    "PercentileConfig": "calibration.configs",
    "UniformGroupsConfig": "calibration.configs",
    "PerStepConfig": "calibration.configs",
    "DataFreeConfig": "calibration.configs",
    "QuantConfig": "calibration.qconfig",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adpdm_export' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
