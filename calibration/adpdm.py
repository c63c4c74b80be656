"""ADP-DM calibration end to end: SRM calibration timestep, then the timestep groups and their scales.

`calibrate_adpdm(qmodel, trajectories, scheduler_config, config)` runs on a model wrapped by
`quant_unet.quantize_model` (it sets the weight scales first unless `calibrate_weights=False`)
and returns an `ADPDMOutcome`; `adpdm_method(ctx)` is the implementation
`calibration.pipeline.calibrate` runs for an `ADPDMConfig` (the pipeline has set the weight
scales already, so it does not redo them); `calibrate_adpdm_result` snapshots a
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
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from calibration.configs import ADPDMConfig
from calibration.group_search import GroupSearchConfig, GroupSearchOutcome, search_groups
from calibration.method_api import CalibrationContext, MethodOutput
from calibration.progress import Progress, no_progress
from calibration.quant_unet import get_config
from calibration.srm import SRMConfig, SRMReport, calibration_set_from_x0, select_calibration_timestep
from calibration.trajectories import DEFAULT_BATCH_SIZE
from calibration.weight_clipping import calibrate_weights
from engines.errors import AdpdmError
from engines.timestep_groups import format_ranges
from engines.scheduling import make_scheduler

MIN_SRM_ITEMS = 3


def search_config(config: ADPDMConfig, seed: int, batch_size: int) -> GroupSearchConfig:
    """The group search's settings from the user's config (the rest keep GroupSearchConfig's defaults)."""
    return GroupSearchConfig(
        num_groups=config.groups, search_iters=config.search_iters, refine_iters=config.refine_iters,
        batch_size=config.search_batch, lr_logits=config.lr_logits, lr_scales=config.lr_scales,
        temp_end=config.temp_end, entropy_weight=config.entropy_weight, init_percentile=config.percentile,
        output_percentile=config.percentile, init=config.init, eval_batch=int(batch_size), seed=int(seed),
        partition=config.partition,
    ).validate()


def srm_config(config: ADPDMConfig, seed: int, batch_size: int, num_items: Optional[int] = None) -> SRMConfig:
    """SRM's settings from the user's config. With fewer than srm_heldout_items + 2 calibration
    items (`num_items`), a quarter of them (at least one) is held out instead, so small
    calibration sets still run."""
    heldout = int(config.srm_heldout_items)
    if num_items is not None and num_items < heldout + 2:
        if num_items < MIN_SRM_ITEMS:
            raise AdpdmError(f"ADP-DM's SRM needs at least {MIN_SRM_ITEMS} calibration samples (2 to score, 1 held "
                             f"out), got {num_items}; use more samples or a fixed calib_step")
        heldout = max(1, num_items // 4)
    return SRMConfig(
        num_candidates=config.srm_candidates, eval_steps=config.srm_eval_steps,
        heldout_items=heldout, lambda_mmd=config.lambda_mmd, num_groups=config.groups,
        percentile=config.percentile, batch_size=int(batch_size), seed=int(seed),
    )


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
            lines.append(f"  group {g}: t in {format_ranges(runs)}")
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
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    calibrate_weights_first: bool = True,
) -> ADPDMOutcome:
    """ADP-DM on a wrapped model from FP trajectories (a `TrajectorySet`); leaves it calibrated.

    seed: search batches, logit noise and SRM's draws. batch_size: UNet batch of the no-grad
    passes. calibrate_weights_first: set the weight scales first (False where the caller has,
    as `calibration.pipeline.calibrate` does).
    progress(stage, step, total, loss): stages "weights", "srm", "data", "init", "search", "refine".
    """
    cfg = config or ADPDMConfig()
    if not isinstance(cfg, ADPDMConfig):
        raise AdpdmError(f"config must be an ADPDMConfig, got {type(cfg).__name__}")
    batch_size = max(int(batch_size), 1)
    num_items = int(trajectories.x_t.shape[1])
    srm = srm_config(cfg, seed, batch_size, num_items if cfg.calib_step is None else None)
    search = search_config(cfg, seed, batch_size)
    progress = progress or no_progress
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    qcfg = get_config(qmodel)
    if calibrate_weights_first:
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
        report = select_calibration_timestep(qmodel, trajectories, ab, srm, progress)
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
                                   seed=int(seed), clip_x0=srm.clip_x0, batch_size=batch_size)
    progress("data", 1, 1, None)
    timings["data_s"] = time.perf_counter() - t0

    # 3. group search, hard partition, refinement, table
    t0 = time.perf_counter()
    outcome = search_groups(qmodel, data, search, progress)
    timings["search_s"] = time.perf_counter() - t0
    timings["adpdm_total_s"] = time.perf_counter() - t_all
    return ADPDMOutcome(
        search=outcome,
        srm=report,
        calib_step=int(step),
        calib_timestep=int(trajectories.timesteps[step]),
        timings=timings,
        config={**cfg.to_dict(), "seed": int(seed), "batch_size": batch_size, "srm": srm.to_dict(),
                "search": search.to_dict()},
    )


# ----------------------------------------------------------------------------------------
# the pipeline's implementation of ADPDMConfig
# ----------------------------------------------------------------------------------------
def adpdm_method(ctx: CalibrationContext) -> MethodOutput:
    """ADP-DM for `calibration.pipeline.calibrate`: ctx.config is the ADPDMConfig, ctx.batch_size the
    UNet batch of its passes, ctx.seed its seed; ctx.log (if any) gets the loss every few search
    iterations and the summary. The weights are the pipeline's: already calibrated."""
    log = ctx.log or (lambda text: None)
    last_logged: dict[str, int] = {}

    def progress(stage: str, step: int, total: int, loss: Optional[float]) -> None:
        if ctx.progress is not None:
            ctx.progress(stage, step, total, loss)
        if loss is not None:
            every = max(1, total // 8)
            if step == total or step - last_logged.get(stage, 0) >= every:
                last_logged[stage] = step
                log(f"[adpdm] {stage} {step}/{total} loss {loss:.3e}")

    out = calibrate_adpdm(ctx.qmodel, ctx.trajectories, ctx.scheduler_config, ctx.config,  # type: ignore[arg-type]
                          progress, seed=ctx.seed, batch_size=ctx.batch_size, calibrate_weights_first=False)
    log(out.summary())
    return MethodOutput(
        calib_timesteps_by_group=out.calib_timesteps_by_group(),
        calib_timestep=out.calib_timestep,
        timings=dict(out.timings),
        extra=out.extra(),
    )


def calibrate_adpdm_result(qmodel: nn.Module, trajectories, scheduler_config: Mapping[str, Any],
                           config: Optional[ADPDMConfig] = None, progress: Optional[Progress] = None,
                           settings: Optional[dict[str, Any]] = None, *, seed: int = 0,
                           batch_size: int = DEFAULT_BATCH_SIZE):
    """calibrate_adpdm, then a `CalibrationResult` snapshot of the calibrated model."""
    from calibration.result import result_from_model

    out = calibrate_adpdm(qmodel, trajectories, scheduler_config, config, progress, seed=seed,
                          batch_size=batch_size)
    return result_from_model(
        qmodel, "adpdm", {"method": "adpdm", **(settings or {}), "adpdm": out.config},
        out.calib_timesteps_by_group(), out.calib_timestep, out.timings, out.extra(),
    )


__all__ = [
    "ADPDMOutcome",
    "adpdm_method",
    "alphas_cumprod_of",
    "calibrate_adpdm",
    "calibrate_adpdm_result",
    "search_config",
    "srm_config",
]
