"""The contract between `calibration.pipeline.calibrate` and a calibration method.

A method is `fn(ctx: CalibrationContext) -> MethodOutput`, registered for its config type
(`calibration.pipeline.register_method`). It finds the wrapped model with weights already
calibrated and leaves activation scales and the timestep->group table in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import nn

from calibration.baselines import StepStats
from calibration.configs import MethodConfig
from calibration.progress import Progress
from calibration.trajectories import TrajectorySet


@dataclass
class CalibrationContext:
    """What a method gets: the wrapped model (G = 1 to start), the FP model, data and settings."""

    config: MethodConfig
    qmodel: nn.Module
    unet: nn.Module  # the FP model (same device)
    scheduler_config: Mapping[str, Any]
    trajectories: TrajectorySet
    num_train_timesteps: int
    batch_size: int
    seed: int
    progress: Optional[Progress] = None
    log: Optional[Callable[[str], None]] = None  # text lines (losses, summaries); None: silent
    step_stats: Optional[StepStats] = None  # per-step statistics observed while sampling, if any
    cache_dir: Optional[str] = None  # where per-step statistics may be cached (beside the trajectories)


@dataclass
class MethodOutput:
    """What a method reports besides the state it leaves in ctx.qmodel."""

    calib_timesteps_by_group: dict[int, list[int]]
    calib_timestep: Optional[int] = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
