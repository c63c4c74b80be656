"""ADP-DM calibration end to end: SRM calibration timestep, then the timestep groups and their scales.

`calibrate_adpdm(qmodel, trajectories, scheduler_config, config)` runs on a model wrapped by
`quant_unet.quantize_model` (it sets the weight scales first unless `config.calibrate_weights`
is False), and returns an `ADPDMOutcome`; `adpdm_method(ctx)` is the plug-in for
`calibration.pipeline.register_method("adpdm", adpdm_method)` (the pipeline has set the
weight scales already, so it does not redo them); `calibrate_adpdm_result` snapshots a
`CalibrationResult` directly.

Steps (docs/method.md):
1. SRM (`calibration.srm`) scores candidate steps tau of the FP trajectories and picks
   tau* (or the calibration timestep is fixed: `calib_step="last"` / a step index, the
   ablation of SRM);
2. the calibration set: x0_hat(tau*) of every trajectory item, forward-noised to every
   calibration timestep, with FP noise predictions as targets;
3. the group search (`calibration.group_search`) on that set: partition, scales, table.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from calibration.group_search import GroupSearchConfig, GroupSearchOutcome, search_groups
from calibration.quant_unet import get_config
from calibration.srm import SRMConfig, SRMReport, calibration_set_from_x0, select_calibration_timestep
from calibration.trajectories import DEFAULT_BATCH_SIZE
from calibration.weight_clipping import calibrate_weights
from engines.errors import AdpdmError
from engines.scheduling import make_scheduler

Progress = Callable[[str, int, int, Optional[float]], None]


@dataclass
class ADPDMConfig:
    """num_groups: G (default 4). calib_step: None (SRM chooses), "last" or a step index
    (fixed; the SRM ablation). srm / search: the two stages' settings (their num_groups
    and seed are overridden by this config's). search_items: trajectory items used as x0
    sources of the search data (None: all; 16 x N steps inputs already exceed the
    search_iters x batch_size pairs the search draws). batch_size: UNet batch of the no-grad
    passes (SRM, calibration set, search evaluation; the pipeline's default). calibrate_weights:
    set weight scales first (False where the caller has, as `calibration.pipeline.calibrate` does)."""

    num_groups: int = 4
    calib_step: Optional[Union[str, int]] = None
    srm: SRMConfig = field(default_factory=SRMConfig)
    search: GroupSearchConfig = field(default_factory=GroupSearchConfig)
    search_items: Optional[int] = 16
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    calibrate_weights: bool = True

    def resolved(self) -> "ADPDMConfig":
        if int(self.num_groups) < 1:
            raise AdpdmError(f"groups must be >= 1, got {self.num_groups}")
        if self.calib_step is not None and self.calib_step != "last":
            try:
                self.calib_step = int(self.calib_step)
            except (TypeError, ValueError):
                raise AdpdmError(f"calib_step must be None, 'last' or a step index, got {self.calib_step!r}") from None
        self.srm.num_groups = int(self.num_groups)
        self.srm.seed = int(self.seed)
        self.srm.batch_size = int(self.batch_size)
        self.search.num_groups = int(self.num_groups)
        self.search.seed = int(self.seed)
        self.search.eval_batch = int(self.batch_size)
        self.search.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ADPDMOutcome:
    search: GroupSearchOutcome
    srm: Optional[SRMReport]
    calib_step: int
    calib_timestep: int
    timings: dict[str, float]
    config: dict[str, Any]

    def calib_timesteps_by_group(self) -> dict[int, list[int]]:
        return self.search.calib_timesteps_by_group()

    def summary(self) -> str:
        lines = [f"ADP-DM: {self.search.num_groups} group(s) over the timesteps (calibration timesteps per group):"]
        for g, runs in enumerate(self.search.ranges()):
            txt = ", ".join(f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in runs)
            lines.append(f"  group {g}: t in {txt}")
        src = "SRM" if self.srm is not None else "fixed"
        lines.append(f"  calibration timestep tau* = {self.calib_timestep} (step {self.calib_step}, {src})")
        if self.srm is not None:
            o = self.srm.rows[self.srm.oracle_best_index]
            lines.append(f"  SRM oracle: best held-out candidate t = {o['timestep']}; tau* held-out error "
                         f"{100 * self.srm.oracle_gap():+.1f}% vs it")
        lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def extra(self) -> dict[str, Any]:
        """JSON-ready record for CalibrationResult.extra."""
        return {
            "adpdm": {
                "calib_step": self.calib_step,
                "calib_timestep": self.calib_timestep,
                "step_groups": self.search.step_groups.tolist(),
                "calib_timesteps": self.search.calib_timesteps.tolist(),
                "group_ranges": [[list(r) for r in runs] for runs in self.search.ranges()],
                "relaxed_pi_max_mean": self.search.mean_max_pi(),
                "search_init_loss": self.search.init_loss,
                "search_final_loss": self.search.history[-1]["data"] if self.search.history else None,
                "srm": self.srm.to_dict() if self.srm is not None else None,
                "config": self.config,
            }
        }


def alphas_cumprod_of(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    return make_scheduler(scheduler_config, "ddim").alphas_cumprod.to(torch.float32)


def calibrate_adpdm(
    qmodel: nn.Module,
    trajectories,
    scheduler_config: Mapping[str, Any],
    config: Optional[ADPDMConfig] = None,
    progress: Optional[Progress] = None,
) -> ADPDMOutcome:
    """ADP-DM on a wrapped model from FP trajectories (a `TrajectorySet`); leaves it calibrated.

    progress(stage, step, total, loss): stages "weights", "srm", "data", "init", "search", "refine".
    """
    cfg = (config or ADPDMConfig()).resolved()
    progress = progress or (lambda *a: None)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    qcfg = get_config(qmodel)
    if cfg.calibrate_weights:
        t0 = time.perf_counter()
        calibrate_weights(qmodel, qcfg.weight_clip_search, qcfg.weight_clip_grid, qcfg.weight_clip_min,
                          progress=lambda d, t: progress("weights", d, t, None))
        timings["weights_s"] = time.perf_counter() - t0
    ab = alphas_cumprod_of(scheduler_config)
    n = int(trajectories.timesteps.numel())

    # 1. calibration timestep
    t0 = time.perf_counter()
    report = None
    if cfg.calib_step is None:
        report = select_calibration_timestep(qmodel, trajectories, ab, cfg.srm, progress)
        step = report.tau_step
    elif cfg.calib_step == "last":
        step = n - 1
    else:
        step = int(cfg.calib_step) % n
    timings["srm_s"] = time.perf_counter() - t0

    # 2. calibration set from x0_hat(tau*)
    t0 = time.perf_counter()
    b = trajectories.x_t.shape[1]
    items = torch.arange(b if cfg.search_items is None else min(b, int(cfg.search_items)))
    cond = {k: v[items] for k, v in (trajectories.cond or {}).items()}
    progress("data", 0, 1, None)
    data = calibration_set_from_x0(qmodel, trajectories.x0_hat[step][items], trajectories.timesteps, ab, cond,
                                   seed=cfg.seed, clip_x0=cfg.srm.clip_x0, batch_size=cfg.batch_size)
    progress("data", 1, 1, None)
    timings["data_s"] = time.perf_counter() - t0

    # 3. group search, hard partition, refinement, table
    t0 = time.perf_counter()
    outcome = search_groups(qmodel, data, cfg.search, progress)
    timings["search_s"] = time.perf_counter() - t0
    timings["adpdm_total_s"] = time.perf_counter() - t_all
    return ADPDMOutcome(
        search=outcome,
        srm=report,
        calib_step=int(step),
        calib_timestep=int(trajectories.timesteps[step]),
        timings=timings,
        config=cfg.to_dict(),
    )


# ----------------------------------------------------------------------------------------
# the pipeline plug-in
# ----------------------------------------------------------------------------------------
_INT_OPTIONS = {"search_iters": ("search", "search_iters"), "refine_iters": ("search", "refine_iters"),
                "search_batch": ("search", "batch_size"), "srm_candidates": ("srm", "num_candidates"),
                "srm_eval_steps": ("srm", "eval_steps"), "srm_heldout_items": ("srm", "heldout_items")}
_FLOAT_OPTIONS = {"entropy_weight": ("search", "entropy_weight"), "lambda_mmd": ("srm", "lambda_mmd"),
                  "temp_end": ("search", "temp_end"), "lr_logits": ("search", "lr_logits"),
                  "lr_scales": ("search", "lr_scales")}


def config_from_options(groups: Optional[int], seed: int, percentile: Optional[float], batch_size: int,
                        options: Optional[Mapping[str, Any]] = None) -> ADPDMConfig:
    """An ADPDMConfig from the pipeline's settings and `options` (keys: calib_step, search_items,
    search_iters, refine_iters, search_batch, srm_candidates, srm_eval_steps, srm_heldout_items,
    entropy_weight, lambda_mmd, temp_end, lr_logits, lr_scales, init, partition)."""
    opts = dict(options or {})
    cfg = ADPDMConfig(num_groups=4 if groups is None else int(groups), seed=int(seed), batch_size=max(int(batch_size), 1))
    if percentile is not None:
        cfg.search.init_percentile = float(percentile)
        cfg.search.output_percentile = float(percentile)
        cfg.srm.percentile = float(percentile)

    def value(key: str, cast):
        raw = opts.pop(key)
        try:
            return cast(raw)
        except (TypeError, ValueError):
            raise AdpdmError(f"ADP-DM option {key} must be {cast.__name__}, got {raw!r}") from None

    if opts.get("calib_step") in (None, "last"):
        cfg.calib_step = opts.pop("calib_step", None)
    else:
        cfg.calib_step = value("calib_step", int)
    if "search_items" in opts:
        cfg.search_items = value("search_items", int)
    if "init" in opts:
        cfg.search.init = str(opts.pop("init"))
    if "partition" in opts:
        cfg.search.partition = str(opts.pop("partition"))
    for table, cast in ((_INT_OPTIONS, int), (_FLOAT_OPTIONS, float)):
        for key, (part, attr) in table.items():
            if key in opts:
                setattr(getattr(cfg, part), attr, value(key, cast))
    for key in list(opts):
        if key in ("on_loss", "log"):
            opts.pop(key)
    if opts:
        raise AdpdmError(f"unknown ADP-DM options: {', '.join(sorted(opts))}")
    return cfg


def _stderr_line(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def adpdm_method(ctx):
    """`fn(ctx: CalibrationContext) -> MethodOutput` for `pipeline.register_method("adpdm", ...)`.

    ctx.options (the CLI's repeatable `--option KEY=VALUE`) may carry the keys of `config_from_options` and
    `log`: a callable taking one line of text (the loss every few search iterations and the
    summary; default: print to stderr; None: silent). ctx.batch_size (`--batch-size`) is the
    UNet batch of ADP-DM's passes as given. The weights are the pipeline's: already calibrated.
    """
    from calibration.pipeline import MethodOutput

    options = dict(ctx.options or {})
    cfg = config_from_options(ctx.groups, ctx.seed, ctx.percentile, ctx.batch_size, options)
    cfg.calibrate_weights = False  # the pipeline set the weight scales before calling the method
    log = options.get("log", _stderr_line)
    last_logged: dict[str, int] = {}

    log = log or (lambda text: None)

    def progress(stage: str, step: int, total: int, loss: Optional[float]) -> None:
        if ctx.progress is not None:
            ctx.progress(stage, step, total)
        if loss is not None:
            every = max(1, total // 8)
            if step == total or step - last_logged.get(stage, 0) >= every:
                last_logged[stage] = step
                log(f"[adpdm] {stage} {step}/{total} loss {loss:.3e}")

    out = calibrate_adpdm(ctx.qmodel, ctx.trajectories, ctx.scheduler_config, cfg, progress)
    log(out.summary())
    return MethodOutput(
        calib_timesteps_by_group=out.calib_timesteps_by_group(),
        calib_timestep=out.calib_timestep,
        timings=dict(out.timings),
        extra=out.extra(),
    )


def calibrate_adpdm_result(qmodel: nn.Module, trajectories, scheduler_config: Mapping[str, Any],
                           config: Optional[ADPDMConfig] = None, progress: Optional[Progress] = None,
                           settings: Optional[dict[str, Any]] = None):
    """calibrate_adpdm, then a `CalibrationResult` snapshot of the calibrated model."""
    from calibration.result import result_from_model

    out = calibrate_adpdm(qmodel, trajectories, scheduler_config, config, progress)
    return result_from_model(
        qmodel, "adpdm", {"method": "adpdm", **(settings or {}), "adpdm": out.config},
        out.calib_timesteps_by_group(), out.calib_timestep, out.timings, out.extra(),
    )


__all__ = [
    "ADPDMConfig",
    "ADPDMOutcome",
    "adpdm_method",
    "alphas_cumprod_of",
    "calibrate_adpdm",
    "calibrate_adpdm_result",
    "config_from_options",
]
