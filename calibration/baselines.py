"""Baseline activation calibrations in the ADP-DM framework, all on the same trajectories.

* `minmax`: one scale set (G = 1): max |x| over the calibration steps (DDIM steps are
  spread uniformly over the timesteps).
* `percentile`: one scale set: the p-th percentile of |x| over the same data.
* `uniform-groups`: G equal timestep intervals [k T/G, (k+1) T/G); each group's scales
  from the calibration steps inside it (no search).
* `per-step`: one group per calibration step (the accuracy ceiling; not deployable as
  a handful of engines); every training timestep maps to the group of the nearest
  calibration timestep (the same rule ADP-DM uses).

Groups are numbered in increasing timestep order; the tables come from
calibration/timestep_tables.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from calibration.observers import ActivationObserver
from calibration.quant_unet import activation_quantizers, get_state, observe_mode, set_table
from calibration.timestep_tables import per_step_table
from calibration.trajectories import TrajectorySet
from engines.errors import AdpdmError
from engines.file_io import atomic_write, sha256_json

STATS = ("minmax", "percentile")


# ----------------------------------------------------------------------------------------
# observation
# ----------------------------------------------------------------------------------------
def calibration_batches(
    traj: TrajectorySet, steps: Optional[list[int]] = None, batch_size: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """(x_t, timesteps (B,), cond) for each chosen step index, in item batches."""
    steps = list(range(traj.num_steps)) if steps is None else list(steps)
    n = traj.num_samples
    for i in steps:
        t = int(traj.timesteps[i])
        for lo in range(0, n, batch_size):
            sl = slice(lo, min(n, lo + batch_size))
            x = traj.x_t[i, sl]
            yield x, torch.full((x.shape[0],), t, dtype=torch.int64), traj.cond_for(sl)


@torch.no_grad()
def observe(
    qmodel: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
    observer: ActivationObserver,
    total: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ActivationObserver:
    """Run the wrapped model in FP over `batches`, feeding every quantizer input to `observer`."""
    dev = next(qmodel.parameters()).device
    with observe_mode(qmodel, observer):
        for k, (x, t, cond) in enumerate(batches):
            qmodel(x.to(dev), t.to(dev), **{a: v.to(dev) for a, v in cond.items()})
            if progress is not None:
                progress(k + 1, total or k + 1)
    return observer


def set_activation_scales(qmodel: nn.Module, amax: dict[str, torch.Tensor]) -> list[str]:
    """Scale = amax / qmax for every activation quantizer; returns those never observed.

    A quantizer whose group saw no data is an error (the group would be uncalibrated);
    a quantizer never called at all keeps scale 1 (it cannot affect the output).
    """
    unobserved = []
    g_count = get_state(qmodel).num_groups
    for name, q in activation_quantizers(qmodel).items():
        a = amax.get(name)
        if a is None:
            unobserved.append(name)
            continue
        if a.numel() != g_count:
            raise AdpdmError(f"{name}: statistics for {a.numel()} groups, model has {g_count}")
        missing = torch.isnan(a).nonzero().flatten().tolist()
        if missing:
            raise AdpdmError(
                f"groups {missing[:8]} received no calibration data (quantizer {name}); "
                "use more calibration steps or fewer groups"
            )
        q.set_amax(a)
    return unobserved


# Histograms (percentile statistic) per calibration step are kept if they fit this budget.
STEP_HIST_BINS = 1024
STEP_HIST_MAX_BYTES = 256 << 20


def step_histograms_fit(num_steps: int, num_quantizers: int) -> bool:
    return num_steps * num_quantizers * STEP_HIST_BINS * 8 <= STEP_HIST_MAX_BYTES


@dataclass
class StepStats:
    """Statistics observed per calibration step (group k = k-th smallest timestep in `timesteps`)."""

    timesteps: list[int]  # ascending, one per per-step group
    observer: ActivationObserver

    def for_table(self, table: torch.Tensor, num_groups: int) -> ActivationObserver:
        """The same statistics grouped by `table` (timestep -> group)."""
        return self.observer.merge_groups([int(table[t]) for t in self.timesteps], num_groups)

    def matches(self, traj: TrajectorySet) -> bool:
        return sorted(self.timesteps) == sorted(set(int(t) for t in traj.timesteps))


def _stats_path(cache_dir, traj: TrajectorySet, qmodel: nn.Module, histogram: bool, batch_size: int):
    from pathlib import Path

    key = {
        "trajectories": traj.settings,
        "quantizers": sorted(activation_quantizers(qmodel)),
        "histogram": bool(histogram),
        "bins": STEP_HIST_BINS,
        "batch_size": int(batch_size),
        "version": 1,
    }
    digest = sha256_json(key, default=str)
    return Path(cache_dir) / f"stepstats-{digest[:32]}.safetensors", key


def save_step_stats(stats: StepStats, cache_dir, traj: TrajectorySet, qmodel: nn.Module, batch_size: int) -> None:
    """Cache per-step statistics next to the trajectories (keyed by them, the quantizer set and settings)."""
    import json

    from safetensors.torch import save_file

    from calibration.observers import observer_to_tensors

    if not traj.settings:
        return
    path, key = _stats_path(cache_dir, traj, qmodel, stats.observer.histogram, batch_size)
    tensors, meta = observer_to_tensors(stats.observer)
    tensors["timesteps"] = torch.tensor(stats.timesteps, dtype=torch.int64)
    metadata = {"key": json.dumps(key, sort_keys=True, default=str), "meta": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_step_stats(cache_dir, traj: TrajectorySet, qmodel: nn.Module, histogram: bool, batch_size: int):
    """Cached per-step statistics for exactly these settings, else None (unreadable files are ignored)."""
    import json
    import warnings

    from safetensors import safe_open

    from calibration.observers import observer_from_tensors

    if not traj.settings:
        return None
    if not histogram:  # statistics with histograms serve max-abs too
        found = load_step_stats(cache_dir, traj, qmodel, True, batch_size)
        if found is not None:
            return found
    path, key = _stats_path(cache_dir, traj, qmodel, histogram, batch_size)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if json.loads(md["key"]) != json.loads(json.dumps(key, sort_keys=True, default=str)):
            return None
        obs = observer_from_tensors(tensors, json.loads(md["meta"]))
        return StepStats([int(t) for t in tensors["timesteps"].tolist()], obs)
    except Exception as e:  # truncated or foreign: observe again
        warnings.warn(f"ignoring unreadable statistics cache {path}: {type(e).__name__}: {e}", stacklevel=2)
        return None


def step_observer(qmodel: nn.Module, num_steps: int, histogram: bool) -> ActivationObserver:
    hist = histogram and step_histograms_fit(num_steps, len(activation_quantizers(qmodel)))
    return ActivationObserver(num_steps, histogram=hist, bins=STEP_HIST_BINS)


def observe_steps(
    qmodel: nn.Module,
    traj: TrajectorySet,
    histogram: bool = False,
    batch_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> StepStats:
    """Statistics of every activation quantizer per calibration step of `traj` (one FP pass).

    The model's table is switched to one group per step for the pass and restored (with
    G changing, activation scales are reset: set them afterwards).
    """
    st = get_state(qmodel)
    old = st.table.clone()
    step_ts = sorted(set(int(t) for t in traj.timesteps))
    obs = step_observer(qmodel, len(step_ts), histogram)
    set_table(qmodel, per_step_table(step_ts, old.numel()))
    per_step = (traj.num_samples + batch_size - 1) // batch_size
    try:
        observe(qmodel, calibration_batches(traj, None, batch_size), obs, total=traj.num_steps * per_step,
                progress=progress)
    finally:
        set_table(qmodel, old)
    return StepStats(step_ts, obs)


def calibrate_activations(
    qmodel: nn.Module,
    traj: TrajectorySet,
    stat: str = "minmax",
    percentile: float = 99.99,
    steps: Optional[list[int]] = None,
    batch_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
    step_stats: Optional[StepStats] = None,
    cache_dir: Optional[str] = None,
) -> dict[str, Any]:
    """Set every activation scale per group from `traj` (all steps or the step indices `steps`).

    The model's timestep->group table decides which group each step feeds. With all steps,
    statistics are gathered per step and merged by the table, so they are the same whether
    they were observed while sampling `traj` (`step_stats`), read from `cache_dir` (keyed by
    the trajectories, the quantizer set and the settings) or gathered in a pass over it now.
    Returns {"unobserved": [...], "step_stats": StepStats or None}.
    """
    if stat not in STATS:
        raise AdpdmError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    st = get_state(qmodel)
    table, g = st.table.clone(), st.num_groups
    need_hist = stat == "percentile"
    if steps is None:
        if step_stats is None or not step_stats.matches(traj) or (need_hist and not step_stats.observer.histogram):
            step_stats = None
            if cache_dir is not None:
                step_stats = load_step_stats(cache_dir, traj, qmodel, need_hist, batch_size)
            if step_stats is None:
                step_stats = observe_steps(qmodel, traj, need_hist, batch_size, progress)
                if cache_dir is not None:
                    save_step_stats(step_stats, cache_dir, traj, qmodel, batch_size)
        elif progress is not None:
            progress(1, 1)
    if steps is None and (step_stats.observer.histogram or not need_hist):
        obs = step_stats.for_table(table, g)
    else:  # chosen steps, or per-step histograms too large: one pass with the model's groups
        obs = ActivationObserver(g, histogram=need_hist, bins=STEP_HIST_BINS)
        steps = list(range(traj.num_steps)) if steps is None else list(steps)
        per_step = (traj.num_samples + batch_size - 1) // batch_size
        observe(qmodel, calibration_batches(traj, steps, batch_size), obs, total=len(steps) * per_step,
                progress=progress)
    amax = obs.amax() if stat == "minmax" else obs.percentile_amax(percentile)
    return {"unobserved": set_activation_scales(qmodel, amax), "step_stats": step_stats}
