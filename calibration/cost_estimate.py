"""What a calibration will cost before it is spent, and a time budget that scales it down.

The cost is counted in *item passes* of the UNet, in three kinds that cost differently:
FP forwards (sampling the trajectories, SRM's and the search's targets and statistics),
fake-quantized forwards (SRM's risks, the search's step errors) and fake-quantized
forward+backward passes (the Adam steps of the search and the refinement); trajectories sampled
in half precision (`DataFreeConfig.precision`) are a fourth kind, `sample`, timed under autocast. The counts follow
the code of each phase (`count_passes`, using the same `srm_config`/`search_config` mapping
the method runs with); a timed probe on the model itself (`probe_seconds`: one batch of each
kind) turns them into seconds on this device.

The budget (`fit_budget`) applies the levels of `BUDGET_LEVELS` in order, each one capping a
few settings of what the user asked, until the estimate fits; docs/method.md ("Calibration
budget") gives the order, why, and the measured quality cost of each level. The trajectories are
counted as sampled: a cached set (same model, seeds, samples, steps) makes the run shorter.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from calibration.adpdm import search_config, srm_config
from calibration.configs import ADPDMConfig, DataFreeConfig, MethodConfig
from calibration.quant_unet import forward_eps, fp_mode, quant_mode
from calibration.sampling_precision import autocast
from engines.errors import AdpdmError

PROBE_BATCH_CAP = 16

KINDS = ("fp", "quant", "train", "sample")


@dataclass(frozen=True)
class PhaseCost:
    """Item passes of one phase, by kind."""

    phase: str
    fp: int = 0
    quant: int = 0
    train: int = 0
    sample: int = 0  # FP forwards in a half sampling precision

    @property
    def passes(self) -> int:
        return self.fp + self.quant + self.train + self.sample


@dataclass(frozen=True)
class ProbeSeconds:
    """Seconds per item of each pass kind, measured on the model (`probe_seconds`)."""

    fp: float
    quant: float
    train: float
    probe_s: float = 0.0  # what the probe itself took
    sample: Optional[float] = None  # an FP forward under the sampling precision's autocast (None: fp32)

    def of(self, phase: PhaseCost) -> float:
        sample = self.fp if self.sample is None else self.sample
        return phase.fp * self.fp + phase.quant * self.quant + phase.train * self.train + phase.sample * sample


@dataclass(frozen=True)
class CostEstimate:
    phases: tuple[PhaseCost, ...]
    probe: Optional[ProbeSeconds] = None
    levels: tuple[str, ...] = ()  # budget levels applied to reach this estimate

    @property
    def passes(self) -> int:
        return sum(p.passes for p in self.phases)

    @property
    def seconds(self) -> Optional[float]:
        return None if self.probe is None else sum(self.probe.of(p) for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"passes": self.passes, "phases": [dataclasses.asdict(p) for p in self.phases]}
        if self.probe is not None:
            d["seconds"] = round(float(self.seconds or 0.0), 3)
            d["probe_seconds_per_item"] = {k: getattr(self.probe, k) for k in KINDS if getattr(self.probe, k) is not None}
            d["probe_s"] = round(self.probe.probe_s, 3)
        if self.levels:
            d["budget_levels"] = list(self.levels)
        return d

    def summary(self) -> str:
        parts = ", ".join(f"{p.phase} {p.passes:,}" for p in self.phases if p.passes)
        line = f"calibration estimate: {self.passes:,} UNet item passes ({parts})"
        if self.seconds is not None:
            line += f", about {_duration(self.seconds)} on this device (probe {self.probe.probe_s:.1f} s)"
        if self.levels:
            line += f"; budget levels applied: {', '.join(self.levels)}"
        return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count_passes(method: MethodConfig, data: DataFreeConfig, *, seed: int = 0, batch_size: int = 64,
                 target: str = "trt") -> tuple[PhaseCost, ...]:
    """The UNet item passes `calibration.pipeline.calibrate` makes for `method` on data-free data
    (`target`: the QuantConfig's graph target; tests/test_cost_estimate.py counts the real ones)."""
    guided = data.guidance_scale > 1.0
    items = data.samples * (2 if guided else 1)  # UNet items per step: both halves under guidance
    n = data.steps
    # sampled in observe mode: statistics included
    phases = [PhaseCost("trajectories", **{"fp" if data.precision == "fp32" else "sample": items * n})]
    if not isinstance(method, ADPDMConfig):  # statistics come with the sampling (observe mode)
        return tuple(phases)
    if method.calib_step is None:
        srm = srm_config(method, seed, batch_size, items)
        h = srm.heldout_items + (srm.heldout_items % 2 if guided else 0)
        n_cal = max(2, min(items - h, int(srm.calib_items))) if srm.calib_items is not None else items - h
        n_cal -= n_cal % 2 if guided else 0
        e = min(srm.eval_steps, n)
        k = min(srm.num_candidates, n)
        phases.append(PhaseCost("srm", fp=e * n_cal * (1 + k), quant=k * e * (n_cal + h)))
    search = search_config(method, seed, batch_size)
    m = items if method.search_items is None else min(items, int(method.search_items))
    phases.append(PhaseCost("data", fp=n * m))
    g = min(search.num_groups, n)
    init_fp = n * min(m, search.init_items) * (1 if search.partition != "search" or g == 1 else 2)  # k-means pass
    phases.append(PhaseCost("init", fp=init_fp, quant=min(n * m, search.loss_ref_items)))
    dp = n * m if search.partition == "scale-dp" and 1 < g < n else 0
    # (partition=search with G > 1 runs each quantizer once per group in its relaxed passes: those
    # cost more per item than the probe's, so its estimate is low)
    phases.append(PhaseCost("search", quant=dp, train=search.search_iters * search.batch_size))
    # the output quantizers (used by the ort target only) get statistics of the final groups
    outputs = n * m if target != "ort" else 0
    phases.append(PhaseCost("refine", fp=outputs, train=search.refine_iters * search.batch_size))
    return tuple(phases)


@torch.no_grad()
def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def probe_seconds(qmodel: nn.Module, example: Callable[[int], tuple[torch.Tensor, torch.Tensor, Mapping[str, Any]]],
                  batch: int = 16, train_batch: int = 16, batch_seconds: float = 2.0,
                  precision: str = "fp32") -> ProbeSeconds:
    """Seconds per item of an FP forward and a fake-quantized forward (at up to `batch` items) and
    of a fake-quantized forward+backward (at up to `train_batch`, the search's batch; 0: not timed,
    for methods without a search).

    A one-item FP forward (untimed warm-up) sizes the timed batches so that each takes about
    `batch_seconds` at most: per-item time falls with the batch on a CPU (the reference model:
    2.7 ms at 4 items, 1.5 ms at 16, 1.3 ms at 64), so small models are timed near the batches
    calibration uses, and big ones (an SD-class UNet on a CPU) still probe in seconds, at a small
    batch whose per-item time errs high. The backward is timed twice when that is cheap (the
    first one allocates its buffers). `example(b)` gives (x, t, cond) for b items on the model's
    device; unset activation scales cost the same as calibrated ones. A half sampling `precision`
    also times the FP forward under its autocast (`sample`)."""
    t_all = time.perf_counter()
    x, t, cond = example(max(1, int(batch), int(train_batch)))

    def part(n: int):
        return x[:n], t[:n], {k: v[:n] for k, v in cond.items()}

    with fp_mode(qmodel):
        x1, t1, c1 = part(1)
        one = _timed(lambda: forward_eps(qmodel, x1, t1, **c1))
        fits = max(1, int(batch_seconds / max(one, 1e-6)))
        b, tb = max(1, min(int(batch), fits)), max(1, min(int(train_batch), fits // 3 or 1))
        xb, tt, cb = part(b)
        fp = _timed(lambda: forward_eps(qmodel, xb, tt, **cb))
        sample = None
        if precision != "fp32":
            with autocast(precision, xb.device):
                forward_eps(qmodel, x1, t1, **c1)  # warm-up: the half kernels' first call
                sample = _timed(lambda: forward_eps(qmodel, xb, tt, **cb)) / b
    with quant_mode(qmodel):
        quant = _timed(lambda: forward_eps(qmodel, xb, tt, **cb))
    train = 0.0
    if int(train_batch) > 0:
        train = _time_backward(qmodel, *part(tb), repeat_below=batch_seconds / 2) / tb
    return ProbeSeconds(fp=fp / b, quant=quant / b, train=train, probe_s=time.perf_counter() - t_all, sample=sample)


def _time_backward(qmodel: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                   repeat_below: float) -> float:
    """Seconds of one fake-quantized forward+backward, gradients to the input only: the model's
    parameters are frozen meanwhile, as in the search (which learns scales, never weights), so no
    weight gradient is computed or left allocated. Timed twice when under `repeat_below` (the first
    backward also allocates its buffers)."""
    params = [p for p in qmodel.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        best = float("inf")
        with quant_mode(qmodel):
            for _ in range(2):
                xr = x.clone().requires_grad_(True)
                t0 = time.perf_counter()
                with torch.enable_grad():
                    forward_eps(qmodel, xr, t, **cond).float().square().mean().backward()
                best = min(best, time.perf_counter() - t0)
                if best > repeat_below:
                    break
        return best
    finally:
        for p in params:
            p.requires_grad_(True)


def _cap(obj: Any, **caps: int) -> Any:
    """`obj` with each capped field at min(its value, cap) (None counts as unbounded)."""
    changes = {}
    for name, cap in caps.items():
        value = getattr(obj, name)
        if value is None or value > cap:
            changes[name] = cap
    return dataclasses.replace(obj, **changes) if changes else obj


@dataclass(frozen=True)
class BudgetLevel:
    name: str
    method: Mapping[str, int]  # ADP-DM fields capped (other methods have none of these)
    data: Mapping[str, int]    # DataFreeConfig fields capped


# The order: first what the reference model's measurements say costs least quality (docs/method.md,
# "Calibration budget"): the search's data items and SRM's candidates, then the Adam steps, then
# the calibration steps (the timestep grid the groups are cut on), last the number of seeds.
BUDGET_LEVELS: tuple[BudgetLevel, ...] = (
    BudgetLevel("search-data", {"search_items": 8, "srm_candidates": 4}, {}),
    BudgetLevel("search-steps", {"search_iters": 50, "refine_iters": 30}, {}),
    BudgetLevel("calib-steps-50", {}, {"steps": 50}),
    BudgetLevel("samples-32", {"srm_heldout_items": 8}, {"samples": 32}),
    BudgetLevel("calib-steps-25", {"search_iters": 25, "refine_iters": 15}, {"steps": 25}),
    BudgetLevel("samples-16", {"srm_heldout_items": 4, "search_items": 4}, {"samples": 16}),
)


def apply_level(level: BudgetLevel, method: MethodConfig, data: DataFreeConfig) -> tuple[MethodConfig, DataFreeConfig]:
    """The configs with one level's caps applied (fields a method lacks are left alone)."""
    names = {f.name for f in dataclasses.fields(method)}  # type: ignore[arg-type]
    method = _cap(method, **{k: v for k, v in level.method.items() if k in names})
    return method, _cap(data, **level.data)


def check_budget_minutes(minutes: Any) -> float:
    """A budget in minutes as a float, or one AdpdmError line (before any model work)."""
    try:
        if isinstance(minutes, bool):
            raise TypeError
        value = float(minutes)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise AdpdmError(f"the calibration budget must be a positive number of minutes, got {minutes!r}")
    return value


def fit_budget(method: MethodConfig, data: DataFreeConfig, budget_s: float, probe: ProbeSeconds, *,
               seed: int = 0, batch_size: int = 64, target: str = "trt",
               levels: Sequence[BudgetLevel] = BUDGET_LEVELS) -> tuple[MethodConfig, DataFreeConfig, CostEstimate]:
    """The first configs along `levels` whose estimate fits `budget_s` seconds (the given ones if they
    fit). One AdpdmError line, before anything is spent, when even the last level does not fit."""
    budget_s = check_budget_minutes(budget_s / 60.0) * 60.0
    applied: list[str] = []
    est = CostEstimate(count_passes(method, data, seed=seed, batch_size=batch_size, target=target), probe)
    for level in levels:
        if (est.seconds or 0.0) <= budget_s:
            break
        new_method, new_data = apply_level(level, method, data)
        if (new_method, new_data) == (method, data):
            continue  # already within this level's caps
        method, data = new_method, new_data
        applied.append(level.name)
        est = CostEstimate(count_passes(method, data, seed=seed, batch_size=batch_size, target=target), probe, tuple(applied))
    if (est.seconds or 0.0) > budget_s:
        raise AdpdmError(f"calibration needs about {_duration(est.seconds or 0.0)} even at the smallest budget level "
                         f"({est.passes:,} UNet item passes); the budget is {_duration(budget_s)}: raise "
                         "--calib-budget-minutes or pass smaller settings")
    return method, data, est


__all__ = [
    "BUDGET_LEVELS", "BudgetLevel", "CostEstimate", "PhaseCost", "ProbeSeconds", "apply_level", "check_budget_minutes",
    "count_passes",
    "fit_budget", "probe_seconds",
]
