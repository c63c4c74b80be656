"""`TimestepGroups`: which timestep group serves each training timestep (ADP-DM's partition).

The one value type for the grouping, shared by calibration (which builds it), the manifest
(which stores its table and ranges) and the runner (which dispatches on it). Its serialised
form is the table itself: `table[t]` is the group of training timestep t, groups numbered
0..G-1 by increasing timestep. `ranges()` gives each group's inclusive (first, last) runs,
the `timestep_ranges` of manifest.json and calibration.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from engines.errors import AdpdmError


@dataclass(frozen=True)
class TimestepGroups:
    """table: group of each training timestep 0..T-1; num_groups: G (default: the largest id + 1)."""

    table: tuple[int, ...]
    num_groups: int
    _lookup: torch.Tensor = field(init=False, repr=False, compare=False)

    def __init__(self, table: Sequence[int] | torch.Tensor, num_groups: Optional[int] = None):
        t = tuple(int(k) for k in (table.reshape(-1).tolist() if isinstance(table, torch.Tensor) else table))
        if not t:
            raise AdpdmError("a timestep -> group table needs at least one timestep")
        g = max(t) + 1 if num_groups is None else int(num_groups)
        bad = sorted({k for k in t if not 0 <= k < g})
        if bad:
            raise AdpdmError(f"the timestep -> group table names group(s) {bad} outside 0..{g - 1}")
        object.__setattr__(self, "table", t)
        object.__setattr__(self, "num_groups", g)
        object.__setattr__(self, "_lookup", torch.tensor(t, dtype=torch.int64))

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls, num_train_timesteps: int) -> "TimestepGroups":
        """One group for every timestep."""
        return cls([0] * int(num_train_timesteps))

    @classmethod
    def uniform(cls, num_groups: int, num_train_timesteps: int) -> "TimestepGroups":
        """Timestep t -> floor(t * G / T): G equal intervals, group 0 the lowest timesteps."""
        g, t = int(num_groups), int(num_train_timesteps)
        if g < 1:
            raise AdpdmError(f"groups must be >= 1, got {g}")
        if g > t:
            raise AdpdmError(f"groups ({g}) cannot exceed the number of training timesteps ({t})")
        return cls([k * g // t for k in range(t)])

    @classmethod
    def nearest(cls, calib_timesteps: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor,
                num_train_timesteps: int) -> "TimestepGroups":
        """Each timestep 0..T-1 -> the label of the nearest calibration timestep (ties: the lower one)."""
        c = torch.as_tensor(calib_timesteps, dtype=torch.int64).reshape(-1)
        lab = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if c.numel() != lab.numel() or c.numel() == 0:
            raise AdpdmError(f"{c.numel()} calibration timesteps but {lab.numel()} labels: one label per timestep")
        order = torch.argsort(c)
        c, lab = c[order], lab[order]
        t = torch.arange(int(num_train_timesteps), dtype=torch.int64)
        idx = (t[:, None] - c[None, :]).abs().argmin(1)  # first minimum: the lower timestep on ties
        return cls(lab[idx])

    @classmethod
    def per_step(cls, calib_timesteps: Iterable[int], num_train_timesteps: int) -> "TimestepGroups":
        """One group per distinct calibration timestep, numbered in increasing timestep order."""
        uniq = sorted(set(int(t) for t in calib_timesteps))
        return cls.nearest(uniq, list(range(len(uniq))), num_train_timesteps)

    # ------------------------------------------------------------------ views
    @property
    def num_train_timesteps(self) -> int:
        return len(self.table)

    def tensor(self) -> torch.Tensor:
        """The table as a new int64 tensor (T,)."""
        return self._lookup.clone()

    def group_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Group id (int64) of every timestep in an integer tensor in [0, T) (checked by the caller)."""
        return self._lookup[timesteps]

    def ranges(self, timesteps: Optional[Iterable[int]] = None) -> list[list[tuple[int, int]]]:
        """Per group, its inclusive (first, last) runs of timesteps, ascending.

        timesteps: only these (e.g. the calibration timesteps: runs of consecutive ones in the same
        group); default every training timestep 0..T-1.
        """
        ts = list(range(len(self.table))) if timesteps is None else sorted(int(t) for t in timesteps)
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_groups)]
        start = 0
        for i in range(1, len(ts) + 1):
            if i == len(ts) or self.table[ts[i]] != self.table[ts[start]]:
                out[self.table[ts[start]]].append((ts[start], ts[i - 1]))
                start = i
        return out

    def calib_timesteps_by_group(self, calib_timesteps: Iterable[int]) -> dict[int, list[int]]:
        """Group -> the calibration timesteps it holds (in the order given; groups without one absent)."""
        out: dict[int, list[int]] = {}
        for t in calib_timesteps:
            out.setdefault(self.table[int(t)], []).append(int(t))
        return out

    def __len__(self) -> int:
        return len(self.table)


def format_ranges(runs: Iterable[Sequence[Any]]) -> str:
    """"0-249, 600" for runs [(0, 249), (600, 600)]."""
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)
