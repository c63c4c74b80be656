"""TimestepGroups: the one timestep -> group value type (tables, ranges, lookups, constructions)."""

from __future__ import annotations

import pytest
import torch

from engines.errors import AdpdmError
from engines.timestep_groups import TimestepGroups, format_ranges


def test_ranges_from_the_table():
    g = TimestepGroups([0, 0, 1, 1, 0])
    assert g.num_groups == 2 and g.num_train_timesteps == 5
    assert g.ranges() == [[(0, 1), (4, 4)], [(2, 3)]]
    # a group the table never names still has its (empty) entry
    assert TimestepGroups([0, 0, 2], num_groups=4).ranges() == [[(0, 1)], [], [(2, 2)], []]
    with pytest.raises(AdpdmError, match="outside"):
        TimestepGroups([0, 3], num_groups=2)
    with pytest.raises(AdpdmError):
        TimestepGroups([])


def test_ranges_over_calibration_timesteps():
    g = TimestepGroups.nearest([900, 700, 500, 300, 100], [2, 2, 1, 1, 0], 1000)
    assert g.ranges([900, 700, 500, 300, 100]) == [[(100, 100)], [(300, 500)], [(700, 900)]]
    assert g.calib_timesteps_by_group([900, 100, 500]) == {2: [900], 0: [100], 1: [500]}


def test_constructions():
    assert TimestepGroups.uniform(4, 1000).ranges() == [[(0, 249)], [(250, 499)], [(500, 749)], [(750, 999)]]
    assert TimestepGroups.single(10).ranges() == [[(0, 9)]]
    n = TimestepGroups.nearest(torch.tensor([900, 100, 500]), torch.tensor([2, 0, 1]), 1000)
    assert n.table[300] == 0 and n.table[301] == 1 and n.table[700] == 1 and n.table[701] == 2  # ties: lower
    assert TimestepGroups.per_step([990, 0, 660, 330, 660], 1000).ranges()[2] == [(496, 825)]
    for bad in (0, 2000):
        with pytest.raises(AdpdmError):
            TimestepGroups.uniform(bad, 1000)
    with pytest.raises(AdpdmError):
        TimestepGroups.nearest([1, 2], [0], 10)


def test_lookup_value_semantics_and_format():
    g = TimestepGroups(torch.tensor([1, 1, 0, 0]))
    assert g.group_of(torch.tensor([3, 0, 2])).tolist() == [0, 1, 0]
    t = g.tensor()
    t[0] = 5  # a copy: the value stays frozen
    assert g.table == (1, 1, 0, 0) and g == TimestepGroups([1, 1, 0, 0]) and len({g, TimestepGroups([1, 1, 0, 0])}) == 1
    assert format_ranges([(0, 249), (600, 600)]) == "0-249, 600"
