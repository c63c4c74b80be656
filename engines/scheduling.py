"""Which diffusers schedulers the sampler drives, built from a model's scheduler config.

`SCHEDULERS` names them without importing diffusers, so CLIs can list them cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from engines.errors import AdpdmError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
}
DEFAULT_SCHEDULER = "ddim"


def check_scheduler(name: str) -> str:
    """A scheduler name we can build, or one AdpdmError line listing them (no diffusers import)."""
    if name not in SCHEDULERS:
        raise AdpdmError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(config: Mapping[str, Any], name: str = DEFAULT_SCHEDULER):
    """A fresh scheduler of kind `name` built from a diffusers scheduler config.

    Keys the target class does not know are ignored by diffusers, so a DDPM
    training config can drive DDIM sampling (the usual diffusers practice).
    """
    cls = getattr(importlib.import_module("diffusers"), SCHEDULERS[check_scheduler(name)])
    return cls.from_config(dict(config))


def num_train_timesteps(config: Mapping[str, Any]) -> int:
    return int(config.get("num_train_timesteps", 1000))
