"""Which diffusers schedulers the sampler drives, built from a model's scheduler config."""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
}
DEFAULT_SCHEDULER = "ddim"


def make_scheduler(config: Mapping[str, Any], name: str = DEFAULT_SCHEDULER):
    """A fresh scheduler of kind `name` built from a diffusers scheduler config.

    Keys the target class does not know are ignored by diffusers, so a DDPM
    training config can drive DDIM sampling (the usual diffusers practice).
    """
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
    return cls.from_config(dict(config))


def num_train_timesteps(config: Mapping[str, Any]) -> int:
    return int(config.get("num_train_timesteps", 1000))
