"""Activation statistics per (quantizer, group): max-abs and a max-abs histogram for percentiles.

`ActivationObserver` is the callable a wrapped model calls with every activation
quantizer's input in `observe_mode`; it splits the batch by each item's group (the
wrapper computed them from the timestep values) so a mixed-group batch feeds each
group's statistics with its own items only.

Histogram ranges are powers of two, so histograms of different groups merge exactly:
statistics collected per calibration step (one group per step) can be reduced to any
grouping of those steps afterwards (`merge_groups`), which lets calibration observe
while the FP model samples its trajectories instead of in a second pass.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from calibration.quantizers import ActQuantizer, per_item_rows
from engines.errors import AdpdmError


def _pow2_at_least(v: float) -> float:
    return 2.0 ** math.ceil(math.log2(v))


class _AbsHistogram:
    """Histogram of |x| over [0, R], R a power of two that grows by doubling (bins merge exactly)."""

    def __init__(self, bins: int, max_samples: int = 1 << 18):
        self.bins = int(bins)
        self.range = 0.0
        self.counts: Optional[torch.Tensor] = None
        self.max_samples = int(max_samples)
        self.calls = 0

    def _grow(self, new_range: float) -> None:
        if self.range == 0.0:
            self.range = new_range  # anything seen so far was 0: bin 0 stays right
            return
        factor = int(round(new_range / self.range))
        if factor <= 1:
            return
        if factor >= self.bins:
            total = self.counts.sum()
            self.counts.zero_()
            self.counts[0] = total
        else:
            merged = self.counts.view(self.bins // factor, factor).sum(1)
            self.counts.zero_()
            self.counts[: merged.numel()] = merged
        self.range = new_range

    def add(self, a: torch.Tensor, amax: float) -> None:
        """a: flat |x| values; amax: their max."""
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=a.device)
        if amax > self.range:
            self._grow(_pow2_at_least(amax))
        n = a.numel()
        self.calls += 1
        if self.range == 0.0:
            self.counts[0] += n
            return
        if n > self.max_samples:  # a strided subsample (offset varies per call), weighted back to n
            step = n // self.max_samples
            a = a[self.calls % step :: step]
        idx = (a.float() * (self.bins / self.range)).to(torch.int64).clamp_(0, self.bins - 1)
        self.counts += torch.bincount(idx, minlength=self.bins).to(torch.float64) * (n / a.numel())

    def merge(self, other: "_AbsHistogram") -> None:
        if other.counts is None:
            return
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=other.counts.device)
        oc = other.counts.to(self.counts.device)
        if other.range > self.range:
            self._grow(other.range)
        if other.range == 0.0:
            self.counts[0] += oc.sum()
            return
        factor = int(round(self.range / other.range))  # a power of two >= 1
        if factor == 1:
            self.counts += oc
        elif factor >= self.bins:
            self.counts[0] += oc.sum()
        else:
            self.counts[: self.bins // factor] += oc.view(self.bins // factor, factor).sum(1)

    def quantile(self, q: float) -> float:
        if self.counts is None or self.range == 0.0:
            return 0.0
        c = self.counts.cumsum(0)
        total = float(c[-1])
        idx = int(torch.searchsorted(c, torch.tensor(q * total, dtype=c.dtype, device=c.device)))
        idx = min(idx, self.bins - 1)
        return (idx + 1) * self.range / self.bins


class ActivationObserver:
    """Max-abs (and optionally histograms) of every activation quantizer's input, per group.

    `histogram=True` keeps a `bins`-bin histogram of |x| per (quantizer, group) for
    `percentile_amax` (tensors above `max_samples` elements are histogrammed through a
    strided subsample, weighted to their full size; the max-abs is always exact).
    Call it as `observer(quantizer, x)` (what `observe_mode` does).
    """

    def __init__(self, num_groups: int, histogram: bool = False, bins: int = 2048, max_samples: int = 1 << 18):
        if bins < 2 or bins & (bins - 1):
            raise AdpdmError(f"histogram bins must be a power of two >= 2, got {bins}")
        self.num_groups = int(num_groups)
        self.histogram = bool(histogram)
        self.bins = int(bins)
        self.max_samples = int(max_samples)
        self._amax: dict[str, torch.Tensor] = {}
        self._count: dict[str, torch.Tensor] = {}
        self._hist: dict[str, list[Optional[_AbsHistogram]]] = {}

    # -- collection --------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, quantizer: ActQuantizer, x: torch.Tensor) -> None:
        st = quantizer._state
        name = quantizer.qname
        if st.uniform_group is not None:
            self._add(name, st.uniform_group, x)
        elif st.group_ids is None:
            self._add(name, 0, x)
        else:
            rows = per_item_rows(st.group_ids.to(x.device), x.shape[0])
            if rows.numel() == 1:
                self._add(name, int(rows[0]), x)
                return
            for g in torch.unique(rows).tolist():
                self._add(name, int(g), x[rows == g])

    def _entry(self, name: str) -> None:
        if name not in self._amax:
            self._amax[name] = torch.full((self.num_groups,), float("nan"), dtype=torch.float64)
            self._count[name] = torch.zeros(self.num_groups, dtype=torch.int64)
            self._hist[name] = [None] * self.num_groups

    def _add(self, name: str, group: int, x: torch.Tensor) -> None:
        if not 0 <= group < self.num_groups:
            raise AdpdmError(f"observer for {self.num_groups} groups got group {group}")
        x = x.detach()
        if x.numel():
            lo, hi = torch.aminmax(x)
            m = max(-float(lo), float(hi))
        else:
            m = 0.0
        self._entry(name)
        cur = self._amax[name][group]
        self._amax[name][group] = m if torch.isnan(cur) else max(float(cur), m)
        self._count[name][group] += x.numel()
        if self.histogram:
            h = self._hist[name][group]
            if h is None:
                h = self._hist[name][group] = _AbsHistogram(self.bins, self.max_samples)
            h.add(x.reshape(-1).abs(), m)

    # -- reduction ---------------------------------------------------------------------
    def merge_groups(self, mapping: Sequence[int], num_groups: int) -> "ActivationObserver":
        """A new observer whose group k holds the union of the groups g with mapping[g] == k.

        Exact for max-abs, counts and histograms (power-of-two ranges).
        """
        if len(mapping) != self.num_groups:
            raise AdpdmError(f"mapping has {len(mapping)} entries for {self.num_groups} groups")
        out = ActivationObserver(num_groups, self.histogram, self.bins, self.max_samples)
        for name in self._amax:
            out._entry(name)
            for g, k in enumerate(mapping):
                if int(self._count[name][g]) == 0:
                    continue
                k = int(k)
                a = float(self._amax[name][g])
                cur = out._amax[name][k]
                out._amax[name][k] = a if torch.isnan(cur) else max(float(cur), a)
                out._count[name][k] += self._count[name][g]
                h = self._hist[name][g]
                if self.histogram and h is not None:
                    if out._hist[name][k] is None:
                        out._hist[name][k] = _AbsHistogram(self.bins, self.max_samples)
                    out._hist[name][k].merge(h)
        return out

    # -- results -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._amax)

    def observed_groups(self, name: str) -> list[int]:
        return [g for g in range(self.num_groups) if int(self._count[name][g]) > 0]

    def amax(self) -> dict[str, torch.Tensor]:
        """Quantizer name -> max |x| per group (float32 (G,), NaN where never observed)."""
        return {n: v.to(torch.float32).clone() for n, v in self._amax.items()}

    def percentile_amax(self, percentile: float) -> dict[str, torch.Tensor]:
        """Quantizer name -> the `percentile`-th percentile of |x| per group (<= amax)."""
        if not self.histogram:
            raise AdpdmError("percentile statistics need an observer created with histogram=True")
        if not 0.0 < percentile <= 100.0:
            raise AdpdmError(f"percentile must be in (0, 100], got {percentile}")
        out = {}
        for n, hs in self._hist.items():
            v = torch.full((self.num_groups,), float("nan"), dtype=torch.float32)
            for g, h in enumerate(hs):
                if h is not None:
                    v[g] = min(h.quantile(percentile / 100.0), float(self._amax[n][g]))
            out[n] = v
        return out


# ----------------------------------------------------------------------------------------
# (de)serialization, for the per-step statistics cache
# ----------------------------------------------------------------------------------------
def observer_to_tensors(obs: ActivationObserver) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and JSON-able metadata that `observer_from_tensors` turns back into `obs`."""
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(obs.names):
        tensors[f"{i}.amax"] = obs._amax[name].clone()
        tensors[f"{i}.count"] = obs._count[name].clone()
        if obs.histogram:
            ranges = torch.zeros(obs.num_groups, dtype=torch.float64)
            counts = torch.zeros(obs.num_groups, obs.bins, dtype=torch.float64)
            present = torch.zeros(obs.num_groups, dtype=torch.int64)
            for g, h in enumerate(obs._hist[name]):
                if h is not None and h.counts is not None:
                    ranges[g], counts[g], present[g] = h.range, h.counts.cpu(), 1
            tensors[f"{i}.range"], tensors[f"{i}.hist"], tensors[f"{i}.present"] = ranges, counts, present
    meta = {"names": obs.names, "num_groups": obs.num_groups, "histogram": obs.histogram, "bins": obs.bins,
            "max_samples": obs.max_samples}
    return tensors, meta


def observer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> ActivationObserver:
    obs = ActivationObserver(int(meta["num_groups"]), bool(meta["histogram"]), int(meta["bins"]),
                             int(meta["max_samples"]))
    for i, name in enumerate(meta["names"]):
        obs._entry(name)
        obs._amax[name] = tensors[f"{i}.amax"].to(torch.float64).clone()
        obs._count[name] = tensors[f"{i}.count"].to(torch.int64).clone()
        if obs.histogram:
            for g in range(obs.num_groups):
                if int(tensors[f"{i}.present"][g]):
                    h = _AbsHistogram(obs.bins, obs.max_samples)
                    h.range = float(tensors[f"{i}.range"][g])
                    h.counts = tensors[f"{i}.hist"][g].to(torch.float64).clone()
                    obs._hist[name][g] = h
    return obs
