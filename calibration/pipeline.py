"""`calibrate(unet, scheduler_config, method_config, quant)`: the one entry point of calibration.

Takes a module and a scheduler config (never model paths; `cache_dir` is only the
trajectory cache), returns a `CalibrationResult`. The method is chosen by the type of its
config (calibration.configs: `ADPDMConfig`, `MinMaxConfig`, ...); implementations are
`fn(ctx: CalibrationContext) -> MethodOutput` (calibration.method_api) in `METHODS`, and
`register_method(ConfigType, fn)` installs or replaces one.

Order: data (data-free trajectories, observing activations per step while sampling, or the
user's own), weights (MSE clipping), then the method's activation scales and
timestep->group table.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from calibration.adpdm import adpdm_method, srm_config
from calibration.baselines import (
    StepStats,
    save_step_stats,
    step_observer,
    calibrate_activations,
)
from calibration.cost_estimate import PROBE_BATCH_CAP, CostEstimate, check_budget_minutes, count_passes, fit_budget, probe_seconds
from calibration.configs import (
    DEFAULT_PERCENTILE,
    ADPDMConfig,
    DataFreeConfig,
    MethodConfig,
    MinMaxConfig,
    PercentileConfig,
    PerStepConfig,
    UniformGroupsConfig,
)
from calibration.fingerprint import model_sha256
from calibration.method_api import CalibrationContext, MethodOutput
from calibration.progress import Progress, stage_steps
from calibration.qconfig import QuantConfig
from calibration.quant_unet import get_state, observe_mode, quantize_model, set_table
from calibration.result import CalibrationResult, result_from_model
from calibration.sampling_precision import PROBE_ITEMS, PrecisionCheck, check_precision
from calibration.timestep_tables import calib_timesteps_by_group, per_step_table, single_group_table, uniform_table
from calibration.trajectories import (
    DEFAULT_BATCH_SIZE,
    TrajectorySet,
    expand_cond,
    generate_trajectories,
    unet_sample_shape,
)
from calibration.user_data import UserData, trajectories_from_batches
from calibration.weight_clipping import calibrate_weights
from engines.errors import AdpdmError
from engines.sampler import interleave
from engines.scheduling import make_scheduler, num_train_timesteps

Data = Union[None, DataFreeConfig, TrajectorySet, UserData]


def _calib_timesteps(ctx: CalibrationContext) -> list[int]:
    return [int(t) for t in ctx.trajectories.timesteps]


def _calibrate_with_table(ctx: CalibrationContext, table: torch.Tensor, stat: str, percentile: float) -> None:
    set_table(ctx.qmodel, table)
    calibrate_activations(ctx.qmodel, ctx.trajectories, stat, percentile, batch_size=ctx.batch_size,
                          progress=stage_steps(ctx.progress, "activations"), step_stats=ctx.step_stats,
                          cache_dir=ctx.cache_dir)


def _minmax(ctx: CalibrationContext) -> MethodOutput:
    table = single_group_table(ctx.num_train_timesteps)
    _calibrate_with_table(ctx, table, "minmax", DEFAULT_PERCENTILE)  # unused by minmax
    return MethodOutput(calib_timesteps_by_group(table, _calib_timesteps(ctx)))


def _percentile(ctx: CalibrationContext) -> MethodOutput:
    table = single_group_table(ctx.num_train_timesteps)
    _calibrate_with_table(ctx, table, "percentile", ctx.config.percentile)  # type: ignore[attr-defined]
    return MethodOutput(calib_timesteps_by_group(table, _calib_timesteps(ctx)))


def _uniform_groups(ctx: CalibrationContext) -> MethodOutput:
    cfg: UniformGroupsConfig = ctx.config  # type: ignore[assignment]
    g = cfg.groups
    table = uniform_table(g, ctx.num_train_timesteps)
    by_group = calib_timesteps_by_group(table, _calib_timesteps(ctx))
    empty = [k for k in range(g) if k not in by_group]
    if empty:
        raise AdpdmError(
            f"uniform groups {empty[:8]} contain no calibration step ({ctx.trajectories.num_steps} steps for {g} groups); "
            "use more --calib-steps or fewer --groups"
        )
    _calibrate_with_table(ctx, table, cfg.stat, cfg.percentile)
    return MethodOutput(by_group)


def _per_step(ctx: CalibrationContext) -> MethodOutput:
    cfg: PerStepConfig = ctx.config  # type: ignore[assignment]
    ts = _calib_timesteps(ctx)
    table = per_step_table(ts, ctx.num_train_timesteps)
    _calibrate_with_table(ctx, table, cfg.stat, cfg.percentile)
    return MethodOutput(calib_timesteps_by_group(table, ts))


METHODS: dict[type, Callable[[CalibrationContext], MethodOutput]] = {
    ADPDMConfig: adpdm_method,
    MinMaxConfig: _minmax,
    PercentileConfig: _percentile,
    UniformGroupsConfig: _uniform_groups,
    PerStepConfig: _per_step,
}


def register_method(config_type: type, fn: Callable[[CalibrationContext], MethodOutput]) -> None:
    """Install (or replace) the implementation of the method configured by `config_type`."""
    METHODS[config_type] = fn


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


def _stat_of(config: MethodConfig) -> str:
    """The range statistic recorded in the settings (ADP-DM's initial scales: max |x| per group)."""
    return getattr(config, "stat", "percentile" if isinstance(config, PercentileConfig) else "minmax")


def _estimate(qmodel, unet, method, data, seed, cond, batch_size, budget_minutes, target):
    """The cost estimate from a timed probe, and the configs fitted to the budget (if any)."""
    shape = unet_sample_shape(unet)
    dev = next(unet.parameters()).device
    t_count = int(get_state(qmodel).table.numel())

    def example(b: int):
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn((b, *shape), generator=gen).to(dev)
        t = torch.randint(0, t_count, (b,), generator=gen).to(dev)
        return x, t, {k: v.to(dev) for k, v in expand_cond(cond, b).items()}

    train_batch = method.search_batch if isinstance(method, ADPDMConfig) else 0  # no search: no backward
    probe = probe_seconds(qmodel, example, batch=min(int(batch_size), PROBE_BATCH_CAP),
                          train_batch=min(train_batch, PROBE_BATCH_CAP), precision=data.precision)
    if budget_minutes is None:
        return method, data, CostEstimate(count_passes(method, data, seed=seed, batch_size=batch_size, target=target),
                                          probe)
    return fit_budget(method, data, float(budget_minutes) * 60.0, probe, seed=seed, batch_size=batch_size,
                      target=target)


def _sampling_precision(unet, data: DataFreeConfig, t_count: int, seed: int, cond, uncond,
                        log: Optional[Callable[[str], None]]) -> PrecisionCheck:
    """The precision the trajectories are sampled in: the one asked for if the probe on this model
    allows it (calibration.sampling_precision), else fp32; said on `log` either way."""
    if data.precision == "fp32":
        return PrecisionCheck("fp32", "fp32")
    if data.guidance_scale > 1.0:  # the probe sees both halves the guided sampler feeds the UNet
        half = PROBE_ITEMS // 2
        u, c = expand_cond(uncond, half), expand_cond(cond, half)
        probe_cond = {k: interleave(u[k], v) for k, v in c.items()}
    else:
        probe_cond = expand_cond(cond, PROBE_ITEMS)
    check = check_precision(unet, data.precision, t_count, unet_sample_shape(unet), seed=seed, cond=probe_cond)
    if log is not None:
        log(check.reason)
    return check


def calibrate(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    method: MethodConfig,
    quant: Optional[QuantConfig] = None,
    *,
    data: Data = None,
    seed: int = 0,
    cond: Optional[Mapping[str, Any]] = None,
    uncond: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Optional[str] = None,
    progress: Optional[Progress] = None,
    log: Optional[Callable[[str], None]] = None,
    extra_settings: Optional[dict[str, Any]] = None,
    budget_minutes: Optional[float] = None,
    on_estimate: Optional[Callable[[CostEstimate], None]] = None,
) -> CalibrationResult:
    """Calibrate `unet` (FP diffusers UNet; moved to `device`) with the method `method` configures.

    quant: what is quantized (QuantConfig; default W8A8). data: None or a DataFreeConfig
    (data-free: the FP model samples `samples` seeds from `seed`), a TrajectorySet, or the
    user's own `(x_t, t[, cond])` batches (an iterable or a callable returning one;
    calibration.user_data). cond: conditions of data-free sampling (see
    trajectories.expand_cond); uncond: the unconditional inputs classifier-free guidance needs
    (DataFreeConfig.guidance_scale > 1; e.g. the negative prompt's embeddings).
    progress(stage, done, total, loss): stages "trajectories",
    "weights", "activations" and ADP-DM's. log: text lines (ADP-DM's losses and summary).
    budget_minutes / on_estimate (data-free only): a timed probe of the wrapped model turns the
    pass counts into seconds (calibration.cost_estimate); the budget scales the settings down
    level by level until the estimate fits (or fails in one line before any sampling), and
    on_estimate gets the estimate the run goes ahead with. The settings record both.
    """
    t_start = time.perf_counter()
    if not isinstance(method, MethodConfig) or type(method) not in METHODS:
        raise AdpdmError(f"method must be one of the method configs ({', '.join(c.__name__ for c in METHODS)}), "
                         f"got {type(method).__name__}")
    quant = quant or QuantConfig()
    if not isinstance(quant, QuantConfig):
        raise AdpdmError(f"quant must be a QuantConfig, got {type(quant).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdpdmError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    data = DataFreeConfig() if data is None else data
    dev = resolve_device(device)
    t_count = num_train_timesteps(scheduler_config)
    if budget_minutes is not None:
        if not isinstance(data, DataFreeConfig):
            raise AdpdmError("a calibration budget scales the data-free sampling; it does not apply to given data")
        budget_minutes = check_budget_minutes(budget_minutes)
    if isinstance(data, DataFreeConfig):
        data.check_for(t_count)
        if isinstance(method, ADPDMConfig) and method.calib_step is None:  # too few items for SRM: before sampling
            srm_config(method, seed, batch_size, data.samples * (2 if data.guidance_scale > 1.0 else 1))
    unet = unet.to(dev).eval()
    sha = model_sha256(unet)
    timings: dict[str, float] = {}

    # The wrapper shares the UNet's weights: calibration learns quantizer scales, never weights, so a
    # second copy (1x the weights: 3.4 GB on SD-1.5) would only cost memory.
    qmodel = quantize_model(unet, quant, table=single_group_table(t_count), share_weights=True)
    precision = None
    if isinstance(data, DataFreeConfig):  # before the estimate, which times sampling in the precision used
        precision = _sampling_precision(unet, data, t_count, seed, cond, uncond, log)
        data = dataclasses.replace(data, precision=precision.used)
    estimate = None
    if isinstance(data, DataFreeConfig) and (budget_minutes is not None or on_estimate is not None):
        method, data, estimate = _estimate(qmodel, unet, method, data, seed, cond, batch_size, budget_minutes,
                                           quant.target)
        timings["estimate_s"] = estimate.probe.probe_s if estimate.probe else 0.0
        if on_estimate is not None:
            on_estimate(estimate)
    t0 = time.perf_counter()
    step_stats = None
    if isinstance(data, DataFreeConfig):
        # Sample with the wrapped model in observe mode (bit-exact FP): statistics per
        # calibration step come for free when the trajectories are not cached.
        scheduler = make_scheduler(scheduler_config, "ddim")
        scheduler.set_timesteps(data.steps)
        step_ts = sorted(set(int(t) for t in scheduler.timesteps))
        observer = step_observer(qmodel, len(step_ts), histogram=(_stat_of(method) == "percentile"))
        set_table(qmodel, per_step_table(step_ts, t_count))
        with observe_mode(qmodel, observer):
            trajectories = generate_trajectories(
                qmodel, scheduler_config, num_samples=data.samples, num_steps=data.steps, seed=seed, cond=cond,
                batch_size=batch_size, cache_dir=cache_dir, model_sha=sha,
                progress=stage_steps(progress, "trajectories"), guidance_scale=data.guidance_scale, uncond=uncond,
                precision=data.precision,
            )
        set_table(qmodel, single_group_table(t_count))
        if not trajectories.from_cache:
            step_stats = StepStats(step_ts, observer)
            if cache_dir is not None and step_stats.matches(trajectories):
                save_step_stats(step_stats, cache_dir, trajectories, qmodel, batch_size)
        source = "data-free"
    elif isinstance(data, TrajectorySet):
        trajectories = data
        if trajectories.settings.get("model_sha256") not in (None, sha):
            raise AdpdmError("the trajectories given were sampled from another model")
        source = "trajectories"
    else:
        trajectories = trajectories_from_batches(
            unet, scheduler_config, data, model_sha=sha, sample_shape=unet_sample_shape(unet), batch_size=batch_size,
            progress=stage_steps(progress, "trajectories"),
        )
        source = "user"
    timings["trajectories_s"] = time.perf_counter() - t0

    ctx = CalibrationContext(
        config=method, qmodel=qmodel, unet=unet, scheduler_config=scheduler_config, trajectories=trajectories,
        num_train_timesteps=t_count, batch_size=int(batch_size), seed=int(seed), progress=progress, log=log,
        step_stats=step_stats, cache_dir=cache_dir,
    )
    # Weights first, here and only here: methods that measure the quantized model's error
    # (ADP-DM) see final weights and do not set them again.
    t0 = time.perf_counter()
    calibrate_weights(qmodel, quant.weight_clip_search, quant.weight_clip_grid, quant.weight_clip_min,
                      progress=stage_steps(progress, "weights"))
    timings["weights_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = METHODS[type(method)](ctx)
    timings["activations_s"] = time.perf_counter() - t0
    timings.update(out.timings)
    timings["total_s"] = time.perf_counter() - t_start

    settings = {
        "method": method.method,
        "groups_requested": getattr(method, "groups", None),
        "stat": _stat_of(method),
        "percentile": float(getattr(method, "percentile", DEFAULT_PERCENTILE)),
        "calib_samples": len(set(trajectories.seeds)),  # seeds; with guidance each is two UNet items
        "calib_items": trajectories.num_samples,
        "calib_steps": trajectories.num_steps,
        "seed": int(seed),
        "sampler": "ddim",
        "guidance_scale": float(trajectories.settings.get("guidance_scale", 1.0)),
        "scheduler_config": {k: v for k, v in dict(scheduler_config).items()},
        "cond_keys": sorted(trajectories.cond),
        "trajectory_key": trajectories.settings,
        "trajectories_cached": bool(trajectories.from_cache),
        "observed_while_sampling": step_stats is not None,
        "device": str(dev),
        # what the FP model sampled in: the cache's own key for a cached set, else this run's check
        "sampling_precision": str(trajectories.settings.get("precision", "fp32")),
        **({"sampling_precision_check": precision.to_dict()} if precision is not None and precision.requested != "fp32"
           else {}),
        "method_config": method.to_dict(),
        "data": source,
        **({"estimate": estimate.to_dict()} if estimate is not None else {}),
        **({"budget_minutes": float(budget_minutes)} if budget_minutes is not None else {}),
        **(extra_settings or {}),
    }
    return result_from_model(
        qmodel, method.method, settings, out.calib_timesteps_by_group, out.calib_timestep, timings, out.extra
    )


def calibrated_model(unet: nn.Module, result: CalibrationResult) -> nn.Module:
    """The wrapped, calibrated copy of `unet` described by `result` (hash checked)."""
    return quantize_model(unet, result=result)
