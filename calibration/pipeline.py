"""`calibrate(unet, scheduler_config, method=...)`: the one entry point of calibration.

Takes a module and a scheduler config (never model paths; `cache_dir` is only the
trajectory cache), returns a `CalibrationResult`. Used by `adpdm calibrate` and by the
`build-engine` orchestration. Methods are looked up in `METHODS`
(`fn(ctx: CalibrationContext) -> MethodOutput`; `register_method` replaces one); "adpdm"
runs `calibration.adpdm.adpdm_method`, imported on first use.

Order: trajectories (observing activations per step while sampling), weights (MSE
clipping), then the method's activation scales and timestep->group table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from calibration.baselines import (
    StepStats,
    save_step_stats,
    step_observer,
    calibrate_activations,
)
from calibration.fingerprint import model_sha256
from calibration.qconfig import QuantConfig, check_bits
from calibration.quant_unet import observe_mode, quantize_model, set_table
from calibration.result import CalibrationResult, result_from_model
from calibration.timestep_tables import calib_timesteps_by_group, per_step_table, single_group_table, uniform_table
from calibration.trajectories import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLES, DEFAULT_STEPS, TrajectorySet, generate_trajectories
from calibration.weight_clipping import calibrate_weights
from engines.errors import AdpdmError
from engines.scheduling import make_scheduler, num_train_timesteps

METHOD_NAMES = ("adpdm", "minmax", "percentile", "uniform-groups", "per-step")
DEFAULT_GROUPS = 4
DEFAULT_PERCENTILE = 99.99

Progress = Callable[[str, int, int], None]


@dataclass
class CalibrationContext:
    """What a method implementation gets: the wrapped model (G = 1 to start), data, settings."""

    qmodel: nn.Module
    unet: nn.Module  # the FP model (same device)
    scheduler_config: Mapping[str, Any]
    trajectories: TrajectorySet
    num_train_timesteps: int
    groups: Optional[int]
    stat: str
    percentile: float
    batch_size: int
    seed: int
    progress: Optional[Progress]
    options: dict[str, Any] = field(default_factory=dict)
    step_stats: Optional[StepStats] = None  # per-step statistics observed while sampling, if any
    cache_dir: Optional[str] = None  # where per-step statistics may be cached (beside the trajectories)


@dataclass
class MethodOutput:
    """A method leaves activation scales and the table in ctx.qmodel and reports these."""

    calib_timesteps_by_group: dict[int, list[int]]
    calib_timestep: Optional[int] = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _step_progress(progress: Optional[Progress], stage: str) -> Optional[Callable[[int, int], None]]:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _calib_timesteps(ctx: CalibrationContext) -> list[int]:
    return [int(t) for t in ctx.trajectories.timesteps]


def _run_single(ctx: CalibrationContext, stat: str) -> MethodOutput:
    if ctx.groups not in (None, 1):
        raise AdpdmError(f"--groups {ctx.groups}: this method uses one scale set (use uniform-groups or adpdm)")
    table = single_group_table(ctx.num_train_timesteps)
    set_table(ctx.qmodel, table)
    calibrate_activations(ctx.qmodel, ctx.trajectories, stat, ctx.percentile, batch_size=ctx.batch_size,
                          progress=_step_progress(ctx.progress, "activations"), step_stats=ctx.step_stats,
                          cache_dir=ctx.cache_dir)
    return MethodOutput(calib_timesteps_by_group(table, _calib_timesteps(ctx)))


def _minmax(ctx: CalibrationContext) -> MethodOutput:
    return _run_single(ctx, "minmax")


def _percentile(ctx: CalibrationContext) -> MethodOutput:
    return _run_single(ctx, "percentile")


def _uniform_groups(ctx: CalibrationContext) -> MethodOutput:
    g = DEFAULT_GROUPS if ctx.groups is None else ctx.groups
    table = uniform_table(g, ctx.num_train_timesteps)
    by_group = calib_timesteps_by_group(table, _calib_timesteps(ctx))
    empty = [k for k in range(g) if k not in by_group]
    if empty:
        raise AdpdmError(
            f"uniform groups {empty[:8]} contain no calibration step ({ctx.trajectories.num_steps} steps for {g} groups); "
            "use more --calib-steps or fewer --groups"
        )
    set_table(ctx.qmodel, table)
    calibrate_activations(ctx.qmodel, ctx.trajectories, ctx.stat, ctx.percentile, batch_size=ctx.batch_size,
                          progress=_step_progress(ctx.progress, "activations"), step_stats=ctx.step_stats,
                          cache_dir=ctx.cache_dir)
    return MethodOutput(by_group)


def _per_step(ctx: CalibrationContext) -> MethodOutput:
    ts = _calib_timesteps(ctx)
    table = per_step_table(ts, ctx.num_train_timesteps)
    g = int(table.max()) + 1
    if ctx.groups not in (None, g):
        raise AdpdmError(f"per-step uses one group per calibration step ({g}); drop --groups or set it to {g}")
    set_table(ctx.qmodel, table)
    calibrate_activations(ctx.qmodel, ctx.trajectories, ctx.stat, ctx.percentile, batch_size=ctx.batch_size,
                          progress=_step_progress(ctx.progress, "activations"), step_stats=ctx.step_stats,
                          cache_dir=ctx.cache_dir)
    return MethodOutput(calib_timesteps_by_group(table, ts))


def _load_adpdm() -> Optional[Callable[[CalibrationContext], MethodOutput]]:
    try:
        from calibration.adpdm import adpdm_method
    except ImportError:
        return None
    return adpdm_method


def _adpdm_missing(ctx: Optional[CalibrationContext]) -> MethodOutput:
    """ADP-DM from calibration.adpdm (loaded on first use); refused while that module is absent."""
    fn = _load_adpdm()
    if fn is None:
        raise AdpdmError(
            "--method adpdm (the ADP-DM group search) is not available in this installation; "
            "use minmax, percentile, uniform-groups or per-step"
        )
    if ctx is None:
        return None  # type: ignore[return-value]  (availability check only)
    return fn(ctx)


METHODS: dict[str, Callable[[CalibrationContext], MethodOutput]] = {
    "adpdm": _adpdm_missing,
    "minmax": _minmax,
    "percentile": _percentile,
    "uniform-groups": _uniform_groups,
    "per-step": _per_step,
}
# The statistic each method uses when the caller does not choose one.
DEFAULT_STAT = {"minmax": "minmax", "percentile": "percentile", "uniform-groups": "minmax", "per-step": "minmax", "adpdm": "minmax"}


def register_method(name: str, fn: Callable[[CalibrationContext], MethodOutput]) -> None:
    """Install (or replace) a calibration method, e.g. the ADP-DM search."""
    METHODS[name] = fn


def check_method_args(method: str, groups: Optional[int], w_bits: Any, a_bits: Any, device: str = "cpu") -> None:
    """Cheap argument checks, before any model loading or sampling."""
    if method not in METHODS:
        raise AdpdmError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if METHODS[method] is _adpdm_missing:
        _adpdm_missing(None)  # refuse before any sampling when ADP-DM is not installed
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if groups is not None and int(groups) < 1:
        raise AdpdmError(f"groups must be >= 1, got {groups}")
    resolve_device(device)


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdpdmError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise AdpdmError(f"unsupported device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdpdmError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    return dev


def calibrate(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    *,
    method: str = "minmax",
    groups: Optional[int] = None,
    w_bits: int = 8,
    a_bits: int = 8,
    config: Optional[QuantConfig] = None,
    calib_samples: int = DEFAULT_SAMPLES,
    calib_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    cond: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    cache_dir: Optional[str] = None,
    stat: Optional[str] = None,
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    trajectories: Optional[TrajectorySet] = None,
    progress: Optional[Progress] = None,
    options: Optional[dict[str, Any]] = None,
    extra_settings: Optional[dict[str, Any]] = None,
) -> CalibrationResult:
    """Calibrate `unet` (FP diffusers UNet; moved to `device`) with `method`.

    config: a QuantConfig (w_bits / a_bits then come from it) or None (defaults with
    the given bits). cond: user conditions (see trajectories.expand_cond) or None.
    progress(stage, done, total): stages "trajectories", "activations", "weights".
    """
    t_start = time.perf_counter()
    if config is None:
        config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    check_method_args(method, groups, config.w_bits, config.a_bits, device)
    stat = stat or DEFAULT_STAT.get(method, "minmax")
    if stat not in ("minmax", "percentile"):
        raise AdpdmError(f"unknown statistic {stat!r}; choose minmax or percentile")
    if not 0.0 < float(percentile) <= 100.0:
        raise AdpdmError(f"percentile must be in (0, 100], got {percentile}")
    dev = resolve_device(device)
    t_count = num_train_timesteps(scheduler_config)
    if trajectories is None and not 1 <= int(calib_steps) <= t_count:
        raise AdpdmError(f"calibration steps must be from 1 to the model's {t_count} training timesteps, got {calib_steps}")
    if trajectories is None and int(calib_samples) < 1:
        raise AdpdmError(f"calibration samples must be >= 1, got {calib_samples}")
    unet = unet.to(dev).eval()
    sha = model_sha256(unet)
    timings: dict[str, float] = {}

    qmodel = quantize_model(unet, config, table=single_group_table(t_count))
    t0 = time.perf_counter()
    step_stats = None
    if trajectories is None:
        # Sample with the wrapped model in observe mode (bit-exact FP): statistics per
        # calibration step come for free when the trajectories are not cached.
        scheduler = make_scheduler(scheduler_config, "ddim")
        scheduler.set_timesteps(int(calib_steps))
        step_ts = sorted(set(int(t) for t in scheduler.timesteps))
        observer = step_observer(qmodel, len(step_ts), histogram=(stat == "percentile"))
        set_table(qmodel, per_step_table(step_ts, t_count))
        with observe_mode(qmodel, observer):
            trajectories = generate_trajectories(
                qmodel, scheduler_config, num_samples=calib_samples, num_steps=calib_steps, seed=seed, cond=cond,
                batch_size=batch_size, cache_dir=cache_dir, model_sha=sha,
                progress=_step_progress(progress, "trajectories"),
            )
        set_table(qmodel, single_group_table(t_count))
        if not trajectories.from_cache:
            step_stats = StepStats(step_ts, observer)
            if cache_dir is not None and step_stats.matches(trajectories):
                save_step_stats(step_stats, cache_dir, trajectories, qmodel, batch_size)
    elif trajectories.settings.get("model_sha256") not in (None, sha):
        raise AdpdmError("the trajectories given were sampled from another model")
    timings["trajectories_s"] = time.perf_counter() - t0

    ctx = CalibrationContext(
        qmodel=qmodel, unet=unet, scheduler_config=scheduler_config, trajectories=trajectories,
        num_train_timesteps=t_count, groups=None if groups is None else int(groups), stat=stat,
        percentile=float(percentile), batch_size=int(batch_size), seed=int(seed), progress=progress,
        options=dict(options or {}), step_stats=step_stats, cache_dir=cache_dir,
    )
    # Weights first, here and only here: methods that measure the quantized model's error
    # (ADP-DM) see final weights and do not set them again.
    t0 = time.perf_counter()
    calibrate_weights(qmodel, config.weight_clip_search, config.weight_clip_grid, config.weight_clip_min,
                      progress=_step_progress(progress, "weights"))
    timings["weights_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = METHODS[method](ctx)
    timings["activations_s"] = time.perf_counter() - t0
    timings.update(out.timings)
    timings["total_s"] = time.perf_counter() - t_start

    settings = {
        "method": method,
        "groups_requested": groups,
        "stat": stat,
        "percentile": float(percentile),
        "calib_samples": trajectories.num_samples,
        "calib_steps": trajectories.num_steps,
        "seed": int(seed),
        "sampler": "ddim",
        "scheduler_config": {k: v for k, v in dict(scheduler_config).items()},
        "cond_keys": sorted(trajectories.cond),
        "trajectory_key": trajectories.settings,
        "trajectories_cached": bool(trajectories.from_cache),
        "observed_while_sampling": step_stats is not None,
        "device": str(dev),
        **(extra_settings or {}),
    }
    return result_from_model(
        qmodel, method, settings, out.calib_timesteps_by_group, out.calib_timestep, timings, out.extra
    )


def calibrated_model(unet: nn.Module, result: CalibrationResult) -> nn.Module:
    """The wrapped, calibrated copy of `unet` described by `result` (hash checked)."""
    return quantize_model(unet, result=result)
