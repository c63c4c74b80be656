"""Timestep -> group tables and partitions of the calibration steps into groups.

The building blocks every calibration method shares (baselines and ADP-DM's search): the
tables (as int64 tensors, what `quant_unet.set_table` installs), made by
`engines.timestep_groups.TimestepGroups`, and the partitions of the N calibration steps
(timestep order) into runs, with the exact dynamic programs that choose them. Groups are
numbered in increasing timestep order (group 0 holds the smallest timesteps).
"""

from __future__ import annotations

from typing import Sequence

import torch

from engines.timestep_groups import TimestepGroups

Timesteps = Sequence[int] | torch.Tensor


# ----------------------------------------------------------------------------------------
# timestep -> group tables
# ----------------------------------------------------------------------------------------
def single_group_table(num_train_timesteps: int) -> torch.Tensor:
    return TimestepGroups.single(num_train_timesteps).tensor()


def uniform_table(num_groups: int, num_train_timesteps: int) -> torch.Tensor:
    """Timestep t -> floor(t * G / T): G equal intervals, group 0 the lowest timesteps."""
    return TimestepGroups.uniform(num_groups, num_train_timesteps).tensor()


def nearest_table(calib_timesteps: Timesteps, labels: Timesteps, num_train_timesteps: int) -> torch.Tensor:
    """Each timestep 0..T-1 -> label of the nearest calibration timestep (ties: the lower one).

    With labels = the calibration steps' groups, the table of a partition of the steps.
    """
    return TimestepGroups.nearest(calib_timesteps, labels, num_train_timesteps).tensor()


def per_step_table(calib_timesteps: Timesteps, num_train_timesteps: int) -> torch.Tensor:
    """One group per distinct calibration timestep, numbered in increasing timestep order."""
    return TimestepGroups.per_step(calib_timesteps, num_train_timesteps).tensor()


def calib_timesteps_by_group(table: torch.Tensor, calib_timesteps: Timesteps) -> dict[int, list[int]]:
    """Group -> the calibration timesteps in it (in the order given; groups without one absent)."""
    return TimestepGroups(table).calib_timesteps_by_group(calib_timesteps)


def group_ranges(step_groups: torch.Tensor, calib_timesteps: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per group, its runs of calibration timesteps as (lo, hi) inclusive, ascending."""
    ct = torch.as_tensor(calib_timesteps, dtype=torch.int64).reshape(-1)
    groups = TimestepGroups.nearest(ct, step_groups, int(ct.max()) + 1)
    return groups.ranges(ct.tolist())


def step_lookup(calib_timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Timestep -> index of that calibration step (-1: not a calibration timestep), (T,) int64."""
    lut = torch.full((int(num_train_timesteps),), -1, dtype=torch.int64)
    lut[calib_timesteps] = torch.arange(calib_timesteps.numel())
    return lut


# ----------------------------------------------------------------------------------------
# partitions of the calibration steps
# ----------------------------------------------------------------------------------------
def uniform_step_groups(num_steps: int, num_groups: int) -> torch.Tensor:
    """G equal runs of consecutive steps (the `uniform-groups` partition), (N,) int64."""
    g = max(1, min(int(num_groups), int(num_steps)))
    return (torch.arange(num_steps) * g // max(1, num_steps)).to(torch.int64)


def canonical_groups(step_groups: torch.Tensor, calib_timesteps: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Drop empty groups and renumber by increasing timestep (first appearance from t = 0 up).

    Returns (new step groups (N,), old group id of each new group).
    """
    sg = torch.as_tensor(step_groups, dtype=torch.int64).reshape(-1)
    order = torch.argsort(torch.as_tensor(calib_timesteps, dtype=torch.int64))
    old_ids: list[int] = []
    for g in sg[order].tolist():
        if g not in old_ids:
            old_ids.append(g)
    remap = {old: new for new, old in enumerate(old_ids)}
    return torch.tensor([remap[g] for g in sg.tolist()], dtype=torch.int64), old_ids


def contiguous_partition(cost: torch.Tensor, max_segments: int, segment_penalty: float = 0.0,
                         min_len: int = 1) -> torch.Tensor:
    """Best split of steps (rows of cost (N, G), in timestep order) into <= max_segments runs.

    Each run takes the label (column) of least total cost; the total (sum of the chosen costs
    + segment_penalty per run) is minimized exactly by dynamic programming. Every run has at
    least `min_len` steps (capped at N). Returns the run index (0..K-1) of every step, in the
    row order given.
    """
    c = cost.to(torch.float64)
    g = c.shape[1]
    pre = torch.cat([torch.zeros(1, g, dtype=torch.float64), c.cumsum(0)])  # (N+1, G)
    # seg[a, b] = min_g sum_{a <= i < b} c[i, g]
    seg = (pre[None, :, :] - pre[:, None, :]).min(-1).values  # (N+1, N+1)
    return segment_partition(seg, max_segments, segment_penalty, min_len)


def segment_partition(seg: torch.Tensor, max_segments: int, segment_penalty: float = 0.0,
                      min_len: int = 1) -> torch.Tensor:
    """The DP of `contiguous_partition` for any run cost: seg[a, b] = cost of the run of steps a..b-1
    (N+1 x N+1). Returns the run index (0..K-1) of every step."""
    n = seg.shape[0] - 1
    min_len = max(1, min(int(min_len), n))
    k_max = max(1, min(int(max_segments), n // min_len))
    inf = float("inf")
    best = torch.full((k_max + 1, n + 1), inf, dtype=torch.float64)
    arg = torch.zeros((k_max + 1, n + 1), dtype=torch.int64)
    best[0, 0] = 0.0
    for k in range(1, k_max + 1):
        for b in range(min_len, n + 1):
            cand = best[k - 1, : b - min_len + 1] + seg[: b - min_len + 1, b] + segment_penalty
            a = int(torch.argmin(cand))
            best[k, b], arg[k, b] = cand[a], a
    k = int(torch.argmin(best[1:, n])) + 1
    out = torch.empty(n, dtype=torch.int64)
    b = n
    while k > 0:
        a = int(arg[k, b])
        out[a:b] = k - 1
        b, k = a, k - 1
    return out


def scale_dp_partition(log_scales: torch.Tensor, weights: torch.Tensor, max_groups: int,
                       min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of steps (rows in timestep order) whose learned per-step log-scales (N x Q) one scale set
    per run fits best: <= max_groups runs minimizing sum_i w_i ||v_i - mean_run||^2 (w-weighted mean)
    exactly. Returns (run index per step, (K x Q) the runs' weighted mean log-scales)."""
    v = log_scales.to(torch.float64)
    w = weights.to(torch.float64).clamp_min(1e-30)[:, None]
    zero = torch.zeros(1, v.shape[1], dtype=torch.float64)
    cw = torch.cat([torch.zeros(1, 1, dtype=torch.float64), w.cumsum(0)])  # (N+1, 1)
    cs = torch.cat([zero, (w * v).cumsum(0)])  # (N+1, Q)
    cq = torch.cat([torch.zeros(1, dtype=torch.float64), (w[:, 0] * (v**2).sum(1)).cumsum(0)])  # (N+1,)
    dw = (cw[None, :, 0] - cw[:, None, 0]).clamp_min(1e-30)  # [a, b]
    ds = cs[None, :, :] - cs[:, None, :]  # (N+1, N+1, Q)
    seg = (cq[None, :] - cq[:, None]) - (ds**2).sum(-1) / dw
    seg = torch.where(torch.arange(seg.shape[0])[None, :] > torch.arange(seg.shape[0])[:, None], seg,
                      torch.full_like(seg, float("inf")))
    runs = segment_partition(seg, max_groups, 0.0, min_len)
    k = int(runs.max()) + 1
    means = torch.stack([(w[runs == r] * v[runs == r]).sum(0) / w[runs == r].sum() for r in range(k)])
    return runs, means.to(torch.float32)
