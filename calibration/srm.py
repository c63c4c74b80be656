"""ADP-DM calibration timestep by structural risk minimization (docs/design.md, "ADP-DM calibration", step 1).

For each candidate step c (timestep tau_c) of the FP calibration trajectories, the
calibration images are x0_hat(tau_c) and the calibration inputs at every evaluation
timestep t are forward-noised from them:

    x_t = sqrt(abar_t) x0_hat(tau_c) + sqrt(1 - abar_t) n        (n fixed across candidates)

Per candidate:

* empirical risk: calibrate a quick proxy of the final quantizer on that data (the
  search's initialization: G groups, per-group percentile of |x|) and measure the mean
  relative L2 error of the noise prediction on the same data;
* MMD^2 between pooled activation features (global-average-pooled outputs of a few
  UNet blocks, FP) of that data and of the true trajectory states x_t at the same
  timesteps: unbiased estimate, RBF kernel with the median heuristic, per timestep,
  averaged over timesteps; each block's features are divided by their RMS on the true
  states so every block weighs the same;
* structural risk R = empirical + lambda * mean_c(empirical) * MMD^2 (lambda is
  dimensionless: an MMD^2 of 0.1 costs lambda * 10% of the typical empirical risk);
* oracle: the same proxy quantizer's error on held-out true trajectory states
  (items never used above), reported beside R so the choice can be checked.

tau* = argmin R.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from calibration.group_search import CalibSet, install_partition, set_scales_from_observer, step_errors
from calibration.observers import ActivationObserver
from calibration.progress import Progress, no_progress
from calibration.quant_unet import forward_eps, fp_mode, get_state, observe_mode, quantized_layers
from calibration.timestep_tables import uniform_step_groups
from engines.errors import AdpdmError



@dataclass
class SRMConfig:
    """num_candidates: candidate steps, evenly spaced over the trajectory, always including
        the last step (or `candidates`: explicit step indices).
    eval_steps: timesteps (evenly spaced steps) at which risk, MMD and oracle are measured.
    heldout_items: trajectory items kept out of everything but the oracle (the last ones).
    calib_items: items (the first ones) whose x0_hat / states give the risk and MMD (None: all
        but the held-out ones).
    lambda_mmd: weight of MMD^2 (in units of the mean empirical risk).
    num_groups / percentile: the proxy quantizer (uniform groups, percentile scales).
    feature_modules: module names whose pooled outputs are the MMD features (None:
        last down block, mid block, first up block when present, else every quantized layer).
    clip_x0: clamp x0_hat to [-1, 1] (the data range) before noising.
    """

    num_candidates: int = 6
    candidates: Optional[list[int]] = None
    eval_steps: int = 6
    heldout_items: int = 16
    calib_items: Optional[int] = 24
    lambda_mmd: float = 15.0
    num_groups: int = 4
    percentile: Optional[float] = 99.99
    feature_modules: Optional[list[str]] = None
    clip_x0: bool = True
    batch_size: int = 256
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SRMReport:
    rows: list[dict[str, Any]]  # step, timestep, empirical_risk, mmd2, structural_risk, oracle
    best_index: int  # index into rows of tau*
    eval_timesteps: list[int]
    lambda_mmd: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tau_step(self) -> int:
        return int(self.rows[self.best_index]["step"])

    @property
    def tau(self) -> int:
        return int(self.rows[self.best_index]["timestep"])

    @property
    def oracle_best_index(self) -> int:
        return min(range(len(self.rows)), key=lambda i: self.rows[i]["oracle"])

    def oracle_gap(self) -> float:
        """(oracle error of tau*) / (best oracle error) - 1."""
        best = self.rows[self.oracle_best_index]["oracle"]
        return float(self.rows[self.best_index]["oracle"] / max(best, 1e-30) - 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "best_index": self.best_index, "tau_step": self.tau_step, "tau": self.tau,
            "oracle_best_step": int(self.rows[self.oracle_best_index]["step"]), "oracle_gap": self.oracle_gap(),
            "eval_timesteps": self.eval_timesteps, "lambda_mmd": self.lambda_mmd, "timings": self.timings,
        }

    def table(self) -> str:
        """Markdown table of every candidate."""
        lines = ["| step | timestep | empirical risk | MMD^2 | structural risk | oracle (held-out) |",
                 "|---:|---:|---:|---:|---:|---:|"]
        for k, r in enumerate(self.rows):
            mark = " **tau***" if k == self.best_index else ""
            mark += " (oracle best)" if k == self.oracle_best_index else ""
            lines.append(f"| {r['step']} | {r['timestep']}{mark} | {r['empirical_risk']:.5f} | {r['mmd2']:.4f} | "
                         f"{r['structural_risk']:.5f} | {r['oracle']:.5f} |")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------
def evenly_spaced(n: int, k: int, include_last: bool = True) -> list[int]:
    """k distinct indices spread evenly over 0..n-1 (the last one included)."""
    k = max(1, min(int(k), int(n)))
    if k == 1:
        return [n - 1] if include_last else [0]
    return sorted(set(int(round(i * (n - 1) / (k - 1))) for i in range(k)))


def forward_noise(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t (S, B, ...) = sqrt(abar_t) x0 (B, ...) + sqrt(1 - abar_t) noise (S, B, ...) for timesteps (S,)."""
    abar = alphas_cumprod.to(torch.float32)[torch.as_tensor(timesteps, dtype=torch.int64)]
    shape = (-1,) + (1,) * (noise.ndim - 1)
    return abar.sqrt().view(shape) * x0.unsqueeze(0) + (1 - abar).sqrt().view(shape) * noise


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth2: Optional[float] = None) -> float:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d), RBF kernel exp(-|a-b|^2 / (2 h^2)).

    h^2 defaults to the median heuristic: half the median squared distance over the union
    (so exp(-d^2 / median(d^2))).
    """
    x = x.to(torch.float64).reshape(x.shape[0], -1)
    y = y.to(torch.float64).reshape(y.shape[0], -1)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise AdpdmError("MMD needs at least two samples on each side")
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth2 is None:
        off = d2[~torch.eye(n + m, dtype=torch.bool)]
        med = float(off.median())
        bandwidth2 = med / 2.0 if med > 0 else 1.0
    k = torch.exp(-d2 / (2.0 * bandwidth2))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def default_feature_modules(model: nn.Module) -> list[str]:
    names = dict(model.named_modules())
    out = []
    down = [n for n in names if n.startswith("down_blocks.") and n.count(".") == 1]
    up = [n for n in names if n.startswith("up_blocks.") and n.count(".") == 1]
    if down:
        out.append(down[-1])
    if "mid_block" in names:
        out.append("mid_block")
    if up:
        out.append(up[0])
    if not out:
        out = list(quantized_layers(model))
    return out


class PooledFeatures:
    """Forward hooks collecting global-average-pooled outputs (B, C) of the named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise AdpdmError(f"feature modules not found in the model: {missing[:4]}")
        self.names = list(names)
        self.buf: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def fn(module, args, output):
            o = output[0] if isinstance(output, (tuple, list)) else output
            o = o.sample if hasattr(o, "sample") else o
            o = o.detach().float()
            self.buf[name].append(o.mean(dim=tuple(range(2, o.ndim))) if o.ndim > 2 else o)
        return fn

    def take(self) -> dict[str, torch.Tensor]:
        out = {n: torch.cat(v) for n, v in self.buf.items() if v}
        self.buf = {n: [] for n in self.names}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _fp_pass(qmodel: nn.Module, timesteps: torch.Tensor, x: torch.Tensor, cond: dict[str, torch.Tensor],
             feats: PooledFeatures, batch_size: int, observer=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FP eps (S, B, ...) and pooled features {name: (S, B, C)} of inputs x (S, B, ...).

    With `observer`, the same FP pass also feeds the activation statistics (observe_mode).
    """
    s, b = x.shape[:2]
    flat = x.reshape(s * b, *x.shape[2:])
    t = torch.as_tensor(timesteps, dtype=torch.int64).repeat_interleave(b)
    items = torch.arange(b).repeat(s)
    out = torch.empty_like(flat)
    feats.take()  # drop anything collected outside this pass
    with (fp_mode(qmodel) if observer is None else observe_mode(qmodel, observer)):
        for lo in range(0, s * b, batch_size):
            sl = slice(lo, min(s * b, lo + batch_size))
            out[sl] = forward_eps(qmodel, flat[sl], t[sl], **{k: v[items[sl]] for k, v in cond.items()}).float()
    f = {n: v.reshape(s, b, -1) for n, v in feats.take().items()}
    return out.reshape(x.shape), f


def _feature_mmd(cand: dict[str, torch.Tensor], true: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
    """Mean over timesteps of MMD^2 between RMS-normalized, concatenated block features."""
    per = []
    s = next(iter(true.values())).shape[0]
    for i in range(s):
        xs, ys = [], []
        for n in true:
            rms = true[n][i].pow(2).mean().sqrt().clamp_min(1e-12)
            xs.append(cand[n][i] / rms)
            ys.append(true[n][i] / rms)
        per.append(mmd2_rbf(torch.cat(xs, 1), torch.cat(ys, 1)))
    return float(sum(per) / len(per)), per


# ----------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------
def select_calibration_timestep(
    qmodel: nn.Module,
    traj,
    alphas_cumprod: torch.Tensor,
    config: Optional[SRMConfig] = None,
    progress: Optional[Progress] = None,
) -> SRMReport:
    """Score every candidate (module doc) on the wrapped `qmodel` and return the report.

    `traj`: FP trajectories with timesteps (N,), x_t / eps / x0_hat (N, B, ...) and cond
    (a `calibration.trajectories.TrajectorySet`). Weight quantizers must be calibrated.
    Leaves the model's activation scales at the proxy calibration of the last candidate
    (callers recalibrate).
    """
    cfg = config or SRMConfig()
    progress = progress or no_progress
    t_start = time.perf_counter()
    n, b = int(traj.timesteps.numel()), int(traj.x_t.shape[1])
    h = int(cfg.heldout_items)
    if getattr(traj, "guided", False):  # both halves of a seed on one side: whole (uncond, cond) pairs
        h += h % 2
    if b - h < 2 or h < 1:
        raise AdpdmError(f"SRM needs >= 2 calibration items and >= 1 held-out item; have {b} items, {h} held out")
    n_cal = b - h if cfg.calib_items is None else max(2, min(b - h, int(cfg.calib_items)))
    if getattr(traj, "guided", False):
        n_cal -= n_cal % 2
    cal_items, held_items = torch.arange(n_cal), torch.arange(b - h, b)
    cand = sorted(set(int(c) % n for c in cfg.candidates)) if cfg.candidates else evenly_spaced(n, cfg.num_candidates)
    ev = torch.tensor(evenly_spaced(n, cfg.eval_steps), dtype=torch.int64)
    ev_t = traj.timesteps[ev].to(torch.int64)
    cond = {k: v for k, v in (traj.cond or {}).items()}
    cond_cal = {k: v[cal_items] for k, v in cond.items()}
    gen = torch.Generator().manual_seed(int(cfg.seed))
    noise = torch.randn((ev.numel(), cal_items.numel(), *traj.x_t.shape[2:]), generator=gen)

    true_cal = CalibSet(ev_t, traj.x_t[ev][:, cal_items], traj.eps[ev][:, cal_items], cond_cal)
    held = CalibSet(ev_t, traj.x_t[ev][:, held_items], traj.eps[ev][:, held_items],
                    {k: v[held_items] for k, v in cond.items()})
    feats = PooledFeatures(qmodel, cfg.feature_modules or default_feature_modules(qmodel))
    sg = uniform_step_groups(ev.numel(), cfg.num_groups)
    install_partition(qmodel, ev_t, sg)
    hist = cfg.percentile is not None and cfg.percentile < 100
    rows = []
    try:
        _, true_f = _fp_pass(qmodel, ev_t, true_cal.x, cond_cal, feats, cfg.batch_size)
        for k, c in enumerate(cand):
            x0 = traj.x0_hat[c][cal_items].float()
            if cfg.clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            x = forward_noise(x0, ev_t, noise, alphas_cumprod)
            obs = ActivationObserver(get_state(qmodel).num_groups, histogram=hist)
            eps_fp, f = _fp_pass(qmodel, ev_t, x, cond_cal, feats, cfg.batch_size, observer=obs)
            set_scales_from_observer(qmodel, obs, cfg.percentile)
            data = CalibSet(ev_t, x, eps_fp, cond_cal)
            emp = float(step_errors(qmodel, data, cfg.batch_size).mean())
            orc = float(step_errors(qmodel, held, cfg.batch_size).mean())
            mmd, _ = _feature_mmd(f, true_f)
            rows.append({"step": int(c), "timestep": int(traj.timesteps[c]), "empirical_risk": emp,
                         "mmd2": mmd, "oracle": orc})
            progress("srm", k + 1, len(cand), emp)
    finally:
        feats.close()
    scale = sum(r["empirical_risk"] for r in rows) / len(rows)
    for r in rows:
        r["structural_risk"] = r["empirical_risk"] + cfg.lambda_mmd * scale * max(r["mmd2"], 0.0)
    best = min(range(len(rows)), key=lambda i: rows[i]["structural_risk"])
    return SRMReport(rows=rows, best_index=best, eval_timesteps=[int(t) for t in ev_t], lambda_mmd=cfg.lambda_mmd,
                     timings={"srm": time.perf_counter() - t_start})


@torch.no_grad()
def calibration_set_from_x0(
    qmodel: nn.Module,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    cond: Optional[dict[str, torch.Tensor]] = None,
    seed: int = 0,
    clip_x0: bool = True,
    batch_size: int = 256,
) -> CalibSet:
    """ADP-DM calibration data: inputs forward-noised from x0 (B, ...) at every timestep (N,), FP targets."""
    from calibration.group_search import fp_predictions

    x0 = x0.float().clamp(-1.0, 1.0) if clip_x0 else x0.float()
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    noise = torch.randn((int(timesteps.numel()), *x0.shape), generator=gen)
    x = forward_noise(x0, timesteps, noise, alphas_cumprod)
    eps = fp_predictions(qmodel, timesteps, x, cond, batch_size)
    return CalibSet(torch.as_tensor(timesteps, dtype=torch.int64), x, eps, dict(cond or {}))


__all__ = [
    "SRMConfig",
    "SRMReport",
    "PooledFeatures",
    "calibration_set_from_x0",
    "default_feature_modules",
    "evenly_spaced",
    "forward_noise",
    "mmd2_rbf",
    "select_calibration_timestep",
]
