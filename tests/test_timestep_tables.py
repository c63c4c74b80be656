"""Timestep -> group tables and partitions of the calibration steps (calibration/timestep_tables.py)."""

from __future__ import annotations

import pytest
import torch

from calibration.timestep_tables import (
    canonical_groups,
    contiguous_partition,
    group_ranges,
    nearest_table,
    per_step_table,
    scale_dp_partition,
    uniform_step_groups,
    uniform_table,
)
from engines.errors import AdpdmError


def test_tables():
    u = uniform_table(4, 1000)
    assert u[0] == 0 and u[249] == 0 and u[250] == 1 and u[999] == 3 and u.numel() == 1000
    n = nearest_table([900, 100, 500], [2, 0, 1], 1000)
    assert n[0] == 0 and n[299] == 0 and n[300] == 0 and n[301] == 1 and n[700] == 1 and n[701] == 2
    p = per_step_table([990, 660, 330, 0], 1000)
    assert p.max() == 3 and p[0] == 0 and p[999] == 3 and p[660] == 2
    with pytest.raises(AdpdmError):
        uniform_table(0, 1000)
    with pytest.raises(AdpdmError):
        uniform_table(2000, 1000)


def test_table_nearest_calibration_timestep():
    ct = torch.tensor([900, 500, 100])
    sg = torch.tensor([2, 1, 0])
    table = nearest_table(ct, sg, 1000)
    assert table.shape == (1000,)
    assert table[0] == 0 and table[300] == 0 and table[301] == 1  # 300 is halfway: smaller wins
    assert table[700] == 1 and table[701] == 2 and table[999] == 2


def test_canonical_groups_drop_empty_and_order_by_timestep():
    ct = torch.tensor([900, 700, 500, 300, 100])
    sg, old = canonical_groups(torch.tensor([3, 3, 0, 0, 2]), ct)
    assert sg.tolist() == [2, 2, 1, 1, 0]
    assert old == [2, 0, 3]
    assert group_ranges(sg, ct) == [[(100, 100)], [(300, 500)], [(700, 900)]]


def test_uniform_step_groups():
    assert uniform_step_groups(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert uniform_step_groups(3, 8).tolist() == [0, 1, 2]


def test_contiguous_partition_dp():
    # noisy per-step preferences for 3 runs: 0 0 0 1 0 1 1 2 2 2 (one stray vote in run 1)
    pref = [0, 0, 0, 1, 0, 1, 1, 2, 2, 2]
    cost = torch.ones(10, 3)
    for i, p in enumerate(pref):
        cost[i, p] = 0.0
    runs = contiguous_partition(cost, 3)
    assert runs.tolist() in ([0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    assert contiguous_partition(cost, 1).tolist() == [0] * 10
    # runs never exceed the budget and are contiguous
    r = contiguous_partition(torch.rand(30, 4, generator=torch.Generator().manual_seed(0)), 4)
    assert int(r.max()) <= 3 and bool((r.diff() >= 0).all())


def test_contiguous_partition_min_run_length():
    cost = torch.ones(20, 3)
    cost[:, 0] = 0.0
    cost[9, 0], cost[9, 1] = 1.0, 0.0  # one step prefers group 1 alone
    assert contiguous_partition(cost, 3).tolist().count(1) == 1
    runs = contiguous_partition(cost, 3, min_len=4)
    assert all(runs.tolist().count(r) >= 4 for r in set(runs.tolist()))


def test_scale_dp_partition_finds_the_runs_of_similar_scales():
    """Steps whose learned log-scales form 3 plateaus are split at the plateaus' edges; the weights
    decide which split a 2-run budget keeps."""
    v = torch.tensor([[0.0]] * 5 + [[1.0]] * 3 + [[3.0]] * 4)
    runs, means = scale_dp_partition(v, torch.ones(12), 3)
    assert runs.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    assert torch.allclose(means.flatten(), torch.tensor([0.0, 1.0, 3.0]))
    # three equal steps of a staircase, two runs: the split falls beside the plateau that weighs most
    v = torch.tensor([[0.0]] * 4 + [[1.0]] * 4 + [[2.0]] * 4)
    heavy_low = torch.tensor([100.0] * 4 + [1.0] * 8)
    assert scale_dp_partition(v, heavy_low, 2)[0].tolist() == [0] * 4 + [1] * 8
    assert scale_dp_partition(v, heavy_low.flip(0), 2)[0].tolist() == [0] * 8 + [1] * 4
