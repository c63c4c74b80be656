"""ADP-DM timestep groups: the partition of the calibration steps and the scales of each group
(docs/design.md, "ADP-DM calibration", step 3; docs/method.md argues each choice).

Given calibration inputs at N calibration timesteps tau_1 > ... > tau_N (a `CalibSet`:
UNet inputs and the FP noise predictions at them), find a partition of the N steps into
at most G groups and one activation scale per (quantized tensor, group). Loss everywhere:
MSE(eps_q, eps_fp) relative to the FP eps, log-scales learned by Adam (LSQ gradients,
straight-through rounding); every partition gets the same number of Adam steps.

Default partition, `scale-dp`:
1. one scale set per step (per-step percentile start), learned for `search_iters` steps;
2. the best split of the timestep-ordered steps into <= G contiguous runs of at least
   `min_group_fraction` of the steps, minimizing the error-weighted spread of the learned
   log-scales inside each run (`timestep_tables.scale_dp_partition`, exact DP); each run starts from its
   weighted mean scales.

The paper's partition, `search`:
1. initial scales: k-means of the per-step log-amax profiles into G groups (`init`), so
   the G groups start distinct;
2. relaxed search: logits A (N, G), pi_i = softmax(A_i / temperature); every activation
   quantizer returns sum_g pi_i,g * Q(x; s[l, g]) for an item at step i
   (`quant_unet.relaxed_mode`). Loss / its value at the initial scales
   + lambda_H(it) * mean_i entropy(pi_i), A and the log-scales optimized jointly; the
   temperature is annealed geometrically and lambda_H ramps up linearly (so the groups
   form before they are frozen);
3. hard partition: the best split into <= G contiguous runs under cost -log softmax(A)
   (`timestep_tables.contiguous_partition`; `contiguous=False`: the plain argmax).

Then, for every partition: empty groups dropped, groups renumbered by increasing timestep
(group 0 holds the smallest timesteps); refinement with the hard partition in place
(`refine_iters` steps; each item uses its own group's scales, so a group's scales get
gradient from its own timesteps alone); the table: every training timestep 0..T-1 maps to
the group of the nearest calibration timestep (`timestep_tables.nearest_table`).

Output-quantizer scales (applied only in the `ort` target, so invisible to the `trt`
loss) are set from per-group percentile statistics of the final partition.

Everything runs on a model wrapped by `quant_unet.quantize_model`; nothing here knows of
paths or ONNX.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from calibration.configs import PARTITIONS
from calibration.observers import ActivationObserver
from calibration.progress import Progress, no_progress
from calibration.quant_unet import (
    activation_quantizers,
    forward_eps,
    fp_mode,
    get_state,
    observe_mode,
    quant_mode,
    relaxed_mode,
    set_table,
)
from calibration.quantizers import ActQuantizer
from calibration.timestep_tables import (
    canonical_groups,
    contiguous_partition,
    nearest_table,
    scale_dp_partition,
    step_lookup,
    uniform_step_groups,
)
from engines.errors import AdpdmError
from engines.timestep_groups import TimestepGroups


# ----------------------------------------------------------------------------------------
# calibration data
# ----------------------------------------------------------------------------------------
@dataclass
class CalibSet:
    """Calibration inputs at N steps for B items.

    timesteps (N,) int64 (distinct values); x (N, B, C, H, W) UNet inputs; eps (N, B, C, H, W)
    the FP noise predictions at those inputs; cond: per-item conditions, each (B, ...).
    """

    timesteps: torch.Tensor
    x: torch.Tensor
    eps: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.int64).reshape(-1)
        if self.x.ndim < 3 or self.x.shape[0] != self.timesteps.numel():
            raise AdpdmError(f"calibration inputs {tuple(self.x.shape)} do not match {self.timesteps.numel()} steps")
        if self.eps.shape != self.x.shape:
            raise AdpdmError(f"FP targets {tuple(self.eps.shape)} do not match inputs {tuple(self.x.shape)}")
        if torch.unique(self.timesteps).numel() != self.timesteps.numel():
            raise AdpdmError("calibration timesteps must be distinct")

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def num_items(self) -> int:
        return int(self.x.shape[1])

    def gather(self, steps: torch.Tensor, items: torch.Tensor):
        """(x, t, eps, cond) for pairs (steps[k], items[k]), each with a leading dim M."""
        x = self.x[steps, items]
        eps = self.eps[steps, items]
        t = self.timesteps[steps]
        cond = {k: v[items] for k, v in self.cond.items()}
        return x, t, eps, cond

    def all_pairs(self, steps: Optional[torch.Tensor] = None, items: Optional[torch.Tensor] = None):
        """(step index, item index) for every pair of the given steps x items, step-major."""
        s = torch.arange(self.num_steps) if steps is None else torch.as_tensor(steps, dtype=torch.int64)
        i = torch.arange(self.num_items) if items is None else torch.as_tensor(items, dtype=torch.int64)
        return s.repeat_interleave(i.numel()), i.repeat(s.numel())

    def subset(self, steps: Optional[torch.Tensor] = None, items: Optional[torch.Tensor] = None) -> "CalibSet":
        s = slice(None) if steps is None else torch.as_tensor(steps, dtype=torch.int64)
        i = slice(None) if items is None else torch.as_tensor(items, dtype=torch.int64)
        return CalibSet(
            timesteps=self.timesteps[s],
            x=self.x[s][:, i],
            eps=self.eps[s][:, i],
            cond={k: v[i] for k, v in self.cond.items()},
        )


@torch.no_grad()
def fp_predictions(
    qmodel: nn.Module, timesteps: torch.Tensor, x: torch.Tensor, cond: Optional[Mapping[str, torch.Tensor]] = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """FP noise predictions (N, B, ...) of the wrapped model at inputs x (N, B, ...) and timesteps (N,)."""
    n, b = x.shape[:2]
    steps = torch.arange(n).repeat_interleave(b)
    items = torch.arange(b).repeat(n)
    flat_x = x.reshape(n * b, *x.shape[2:])
    t = torch.as_tensor(timesteps, dtype=torch.int64)[steps]
    cond = dict(cond or {})
    out = torch.empty_like(flat_x)
    with fp_mode(qmodel):
        for lo in range(0, n * b, batch_size):
            sl = slice(lo, min(n * b, lo + batch_size))
            c = {k: v[items[sl]] for k, v in cond.items()}
            out[sl] = forward_eps(qmodel, flat_x[sl], t[sl], **c).to(torch.float32)
    return out.reshape(x.shape)


@torch.no_grad()
def step_errors(
    qmodel: nn.Module, data: CalibSet, batch_size: int = 256, quantized: bool = True
) -> torch.Tensor:
    """Relative L2 ||eps_q - eps_fp|| / ||eps_fp|| per step (N,), averaged over items, hard groups."""
    steps, items = data.all_pairs()
    err = torch.zeros(data.num_steps, dtype=torch.float64)
    cnt = torch.zeros(data.num_steps, dtype=torch.float64)
    ctx = quant_mode(qmodel) if quantized else fp_mode(qmodel)
    with ctx:
        for lo in range(0, steps.numel(), batch_size):
            s, i = steps[lo: lo + batch_size], items[lo: lo + batch_size]
            x, t, eps, cond = data.gather(s, i)
            out = forward_eps(qmodel, x, t, **cond).to(torch.float32)
            num = (out - eps).flatten(1).norm(dim=1)
            den = eps.flatten(1).norm(dim=1).clamp_min(1e-12)
            err.index_add_(0, s, (num / den).double())
            cnt.index_add_(0, s, torch.ones_like(num, dtype=torch.float64))
    return (err / cnt.clamp_min(1)).to(torch.float32)


def install_partition(qmodel: nn.Module, calib_timesteps: torch.Tensor, step_groups: torch.Tensor) -> torch.Tensor:
    """Install the table of `step_groups` on the wrapped model (resizing quantizers); returns it."""
    st = get_state(qmodel)
    table = nearest_table(calib_timesteps, step_groups, st.table.numel())
    _freeze_all(qmodel)
    set_table(qmodel, table)
    return table


# ----------------------------------------------------------------------------------------
# scale initialization from statistics
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def observe(qmodel: nn.Module, data: CalibSet, batch_size: int = 256, histogram: bool = True,
            pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> ActivationObserver:
    """FP statistics of every activation quantizer's input per group (groups from the model's table)."""
    st = get_state(qmodel)
    obs = ActivationObserver(st.num_groups, histogram=histogram)
    steps, items = data.all_pairs() if pairs is None else pairs
    with observe_mode(qmodel, obs):
        for lo in range(0, steps.numel(), batch_size):
            x, t, _, cond = data.gather(steps[lo: lo + batch_size], items[lo: lo + batch_size])
            forward_eps(qmodel, x, t, **cond)
    return obs


def set_scales_from_observer(
    qmodel: nn.Module, obs: ActivationObserver, percentile: Optional[float] = 99.99,
    names: Optional[set[str]] = None,
) -> None:
    """Set activation scales to the per-group percentile (None: max) of |x|.

    A group never observed by a quantizer keeps the quantizer's largest observed amax.
    """
    amax = obs.amax() if percentile is None or percentile >= 100 else obs.percentile_amax(percentile)
    full = obs.amax()
    for name, q in activation_quantizers(qmodel).items():
        if names is not None and name not in names:
            continue
        if name not in amax:
            continue
        a = amax[name].clone()
        m = full[name]
        fallback = float(m[torch.isfinite(m)].max()) if torch.isfinite(m).any() else 1.0
        a = torch.where(torch.isnan(a), torch.full_like(a, fallback), a)
        a = torch.where(torch.isfinite(a) & (a > 0), a, torch.ones_like(a))
        q.set_amax(a)


# ----------------------------------------------------------------------------------------
# learnable scales
# ----------------------------------------------------------------------------------------
def searchable_quantizers(qmodel: nn.Module) -> dict[str, ActQuantizer]:
    """The activation quantizers whose scales the loss sees (those that apply in the graph target)."""
    return {n: q for n, q in activation_quantizers(qmodel).items() if q.applies()}


def _freeze_all(qmodel: nn.Module) -> None:
    for q in activation_quantizers(qmodel).values():
        q.freeze()


@contextlib.contextmanager
def _frozen_model_params(qmodel: nn.Module) -> Iterator[None]:
    """Model weights without gradients for the duration (restored after)."""
    flags = [(p, p.requires_grad) for p in qmodel.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _learnable_log_scales(qmodel: nn.Module) -> list[nn.Parameter]:
    params = []
    for q in searchable_quantizers(qmodel).values():
        p = q.make_learnable()
        p.requires_grad_(True)
        params.append(p)
    return params


def _rel_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)


def _entropy(pi: torch.Tensor) -> torch.Tensor:
    return -(pi * torch.log(pi.clamp_min(1e-12))).sum(-1)


# ----------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------


@dataclass
class GroupSearchConfig:
    """Hyper-parameters of the search and the refinement (docs/method.md argues each).

    num_groups: G, the most groups (empty ones are dropped).
    search_iters / refine_iters: Adam steps of the relaxed search and of the refinement.
    batch_size: (step, item) pairs per Adam step, drawn uniformly at random.
    lr_logits / lr_scales: Adam learning rates of the logits A and of the log-scales.
    temp_start / temp_end: softmax temperature, annealed geometrically over the search.
    entropy_weight: lambda_H (the data term is normalized to 1 at the initial scales),
        ramped linearly from 0 over the first `entropy_ramp` fraction of the search.
    init_percentile: percentile of |x| giving the initial per-group scales (None: max).
    output_percentile: percentile for the output quantizers (ort target), per final group.
    init_prior: initial logit bonus for each step's initial group (0: none).
    init: the partition giving the initial per-group scales: `kmeans` (of the per-step
        log max|x| profiles over all quantizers) or `uniform` (G equal runs of steps).
    init_items: items per step observed for the initial partition and scales.
    contiguous: hard partition = the best split into <= G runs of consecutive timesteps under
        cost -log softmax(A) (else the plain per-step argmax, groups possibly fragmented).
    min_group_fraction: with `contiguous`, every run spans at least this fraction of the steps
        (5%: 5 of 100), so no group's scales are refined on a step or two.
    loss_ref_items: (step, item) pairs giving the loss normalization (loss at the initial scales).
    eval_batch: batch size of no-grad passes.
    seed: batch sampling and logit noise.
    partition: how the steps are split (every partition gets the same search_iters + refine_iters
        Adam steps on the scales, so partitions compare at equal learning):
        `scale-dp` (default): per-step scales learned for search_iters steps, then the <= G
            contiguous runs their log-scales fit best (weighted by each step's error;
            `scale_dp_partition`), each run starting from its mean scales, then the refinement;
        `search`: the paper's relaxed search over logits decides (steps 1-3 of the module doc);
        `per-step`: one group per calibration step, the learned per-step ceiling that groups are
            measured against.
        With G = 1 every partition is the same: one scale set, learned directly.
    """

    num_groups: int = 4
    search_iters: int = 100
    refine_iters: int = 60
    batch_size: int = 16
    lr_logits: float = 0.1
    lr_scales: float = 5e-3
    refine_lr: float = 2e-3
    temp_start: float = 1.0
    temp_end: float = 0.05
    entropy_weight: float = 0.05
    entropy_ramp: float = 0.5
    init_percentile: Optional[float] = 99.99
    output_percentile: Optional[float] = 99.99
    init_prior: float = 0.0
    init: str = "kmeans"
    init_items: int = 8
    contiguous: bool = True
    min_group_fraction: float = 0.05
    loss_ref_items: int = 128
    eval_batch: int = 256
    seed: int = 0
    partition: str = "scale-dp"

    def validate(self) -> "GroupSearchConfig":
        if self.partition not in PARTITIONS:
            raise AdpdmError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if int(self.num_groups) < 1:
            raise AdpdmError(f"num_groups must be >= 1, got {self.num_groups}")
        if int(self.search_iters) < 0 or int(self.refine_iters) < 0 or int(self.batch_size) < 1:
            raise AdpdmError("search_iters and refine_iters must be >= 0, batch_size >= 1")
        if not (self.temp_start > 0 and self.temp_end > 0):
            raise AdpdmError("temperatures must be > 0")
        if self.entropy_weight < 0:
            raise AdpdmError("entropy_weight must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GroupSearchOutcome:
    step_groups: torch.Tensor  # (N,) final groups, canonical numbering
    table: torch.Tensor  # (T,)
    calib_timesteps: torch.Tensor  # (N,)
    pi: torch.Tensor  # (N, G) final relaxed weights (search numbering)
    relaxed_groups: torch.Tensor  # (N,) argmax before dropping / renumbering
    history: list[dict[str, float]]  # stage, it, loss, data, entropy, temperature
    init_loss: float
    timings: dict[str, float]

    @property
    def groups(self) -> TimestepGroups:
        """The table as the grouping value type (a calibration timestep's group is its step's group)."""
        return TimestepGroups(self.table)

    @property
    def num_groups(self) -> int:
        return int(self.step_groups.max()) + 1

    def ranges(self) -> list[list[tuple[int, int]]]:
        """Per group, its runs of calibration timesteps as (lo, hi) inclusive, ascending."""
        return self.groups.ranges(self.calib_timesteps.tolist())

    def calib_timesteps_by_group(self) -> dict[int, list[int]]:
        return self.groups.calib_timesteps_by_group(self.calib_timesteps.tolist())

    def mean_max_pi(self) -> float:
        return float(self.pi.max(1).values.mean())


def kmeans_step_groups(features: torch.Tensor, num_groups: int, iters: int = 50) -> torch.Tensor:
    """Deterministic k-means of per-step feature rows (N, D) into <= num_groups clusters, (N,) int64.

    Centers start at the means of G equal runs of consecutive steps; an emptied cluster is
    re-seeded with the step farthest from its center.
    """
    f = features.to(torch.float64)
    n = f.shape[0]
    g = max(1, min(int(num_groups), n))
    assign = uniform_step_groups(n, g)
    centers = torch.stack([f[assign == k].mean(0) for k in range(g)])
    for _ in range(int(iters)):
        d = torch.cdist(f, centers)
        new = d.argmin(1)
        for k in range(g):
            if not bool((new == k).any()):
                far = int(d.gather(1, new[:, None]).squeeze(1).argmax())
                new[far] = k
        if torch.equal(new, assign):
            break
        assign = new
        centers = torch.stack([f[assign == k].mean(0) for k in range(g)])
    return assign.to(torch.int64)


@torch.no_grad()
def per_step_log_amax(qmodel: nn.Module, data: CalibSet, batch_size: int = 256, max_items: int = 16) -> torch.Tensor:
    """log max|x| of every searchable activation quantizer at every step (N, L) (FP statistics)."""
    install_partition(qmodel, data.timesteps, torch.arange(data.num_steps))
    items = torch.arange(min(data.num_items, int(max_items)))
    obs = observe(qmodel, data, batch_size, histogram=False, pairs=data.all_pairs(items=items))
    amax = obs.amax()
    names = [n for n in searchable_quantizers(qmodel) if n in amax]
    if not names:
        return torch.zeros(data.num_steps, 1)
    a = torch.stack([amax[n] for n in names], 1)  # (N, L)
    a = torch.where(torch.isfinite(a), a, torch.ones_like(a))
    return a.clamp_min(1e-8).log()


def initial_step_groups(qmodel: nn.Module, data: CalibSet, num_groups: int, init: str = "kmeans",
                        batch_size: int = 256, max_items: int = 8) -> torch.Tensor:
    """The partition the search starts from: `uniform` runs, or `kmeans` of per-step log max|x|."""
    if init == "uniform" or num_groups <= 1:
        return uniform_step_groups(data.num_steps, num_groups)
    if init != "kmeans":
        raise AdpdmError(f"unknown group initialization {init!r}: uniform or kmeans")
    sg = kmeans_step_groups(per_step_log_amax(qmodel, data, batch_size, max_items), num_groups)
    return canonical_groups(sg, data.timesteps)[0]


def initialize_groups(qmodel: nn.Module, data: CalibSet, step_groups: torch.Tensor, percentile: Optional[float],
                      batch_size: int = 256, pairs=None) -> None:
    """Install the partition `step_groups` and per-group percentile scales from FP statistics."""
    install_partition(qmodel, data.timesteps, step_groups)
    obs = observe(qmodel, data, batch_size, histogram=percentile is not None and percentile < 100, pairs=pairs)
    set_scales_from_observer(qmodel, obs, percentile)


def initialize_uniform(qmodel: nn.Module, data: CalibSet, num_groups: int, percentile: Optional[float],
                       batch_size: int = 256, pairs=None) -> torch.Tensor:
    """Install the uniform partition of the steps into `num_groups` and per-group percentile scales."""
    sg = uniform_step_groups(data.num_steps, num_groups)
    install_partition(qmodel, data.timesteps, sg)
    obs = observe(qmodel, data, batch_size, histogram=percentile is not None and percentile < 100, pairs=pairs)
    set_scales_from_observer(qmodel, obs, percentile)
    return sg


@torch.no_grad()
def _hard_loss(qmodel: nn.Module, data: CalibSet, pairs, batch_size: int) -> float:
    tot, n = 0.0, 0
    with quant_mode(qmodel):
        for lo in range(0, pairs[0].numel(), batch_size):
            x, t, eps, cond = data.gather(pairs[0][lo: lo + batch_size], pairs[1][lo: lo + batch_size])
            out = forward_eps(qmodel, x, t, **cond)
            tot += float(_rel_mse(out, eps)) * x.shape[0]
            n += x.shape[0]
    return tot / max(n, 1)


def search_groups(
    qmodel: nn.Module,
    data: CalibSet,
    config: Optional[GroupSearchConfig] = None,
    progress: Optional[Progress] = None,
) -> GroupSearchOutcome:
    """Run steps 1-5 (module doc) on the wrapped `qmodel`; leaves it calibrated (hard groups).

    Weight quantizers must already hold their scales; they are not changed.
    """
    cfg = (config or GroupSearchConfig()).validate()
    progress = progress or no_progress
    st = get_state(qmodel)
    t_count = st.table.numel()
    if int(data.timesteps.max()) >= t_count or int(data.timesteps.min()) < 0:
        raise AdpdmError(f"calibration timesteps outside the model's range 0..{t_count - 1}")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    n, g = data.num_steps, max(1, min(int(cfg.num_groups), data.num_steps))
    g_max = g
    timings: dict[str, float] = {}
    history: list[dict[str, float]] = []

    # a fixed evaluation subset for the loss reference (at most ~4 batches)
    n_eval = min(n * data.num_items, int(cfg.loss_ref_items))
    perm = torch.randperm(n * data.num_items, generator=gen)[:n_eval]
    eval_pairs = (perm // data.num_items, perm % data.num_items)

    t0 = time.perf_counter()
    progress("init", 0, 1, None)
    # scale-dp learns on the per-step partition first; with G = 1 there is one partition, learned directly
    fixed = cfg.partition == "per-step" or (cfg.partition == "scale-dp" and g_max > 1)
    uni = torch.arange(n) if fixed else initial_step_groups(qmodel, data, g, cfg.init, cfg.eval_batch, cfg.init_items)
    g = int(uni.max()) + 1
    init_pairs = data.all_pairs(items=torch.arange(min(data.num_items, int(cfg.init_items))))
    initialize_groups(qmodel, data, uni, cfg.init_percentile, cfg.eval_batch, pairs=init_pairs)
    init_loss = _hard_loss(qmodel, data, eval_pairs, cfg.eval_batch)
    progress("init", 1, 1, init_loss)
    timings["init"] = time.perf_counter() - t0

    # ---- relaxed search ------------------------------------------------------------
    t0 = time.perf_counter()
    lut = step_lookup(data.timesteps, t_count)
    logits = torch.zeros(n, g)
    if fixed:  # one-hot at every temperature (reported pi; the fixed partition learns in the hard mode)
        logits[torch.arange(n), uni] = 30.0
    elif cfg.init_prior:
        logits[torch.arange(n), uni] += float(cfg.init_prior)
    if not fixed:
        logits = logits + 1e-3 * torch.randn(n, g, generator=gen)
    logits = nn.Parameter(logits)
    learn_partition = g > 1 and not fixed
    temp = {"value": float(cfg.temp_start)}

    def mixture_fn(tt: torch.Tensor) -> torch.Tensor:
        idx = lut[tt]
        if bool((idx < 0).any()):
            raise AdpdmError("relaxed forward at a timestep that is not a calibration timestep")
        return torch.softmax(logits[idx] / temp["value"], dim=-1)

    ref = max(init_loss, 1e-12)
    with _frozen_model_params(qmodel):
        scales = _learnable_log_scales(qmodel)
        # The scales learn for search_iters steps whatever the partition (G = 1 and per-step too), so
        # G groups are compared with one group, or with per-step scales, at the same learning.
        if cfg.search_iters > 0:
            groups = [{"params": scales, "lr": cfg.lr_scales}]
            if learn_partition:
                groups.insert(0, {"params": [logits], "lr": cfg.lr_logits})
            opt = torch.optim.Adam(groups)
            iters = int(cfg.search_iters)
            ratio = cfg.temp_end / cfg.temp_start
            # a fixed partition (G = 1, per-step) learns in the hard mode on the table initialize_groups
            # installed: the same loss without N copies of every activation
            mode = relaxed_mode(qmodel, mixture_fn) if learn_partition else contextlib.nullcontext()
            with mode, quant_mode(qmodel):
                for it in range(iters):
                    frac = it / max(1, iters - 1)
                    temp["value"] = cfg.temp_start * ratio ** frac
                    lam = cfg.entropy_weight * min(1.0, frac / cfg.entropy_ramp) if cfg.entropy_ramp > 0 else cfg.entropy_weight
                    k = torch.randint(0, n * data.num_items, (cfg.batch_size,), generator=gen)
                    x, t, eps, cond = data.gather(k // data.num_items, k % data.num_items)
                    out = forward_eps(qmodel, x, t, **cond)
                    data_loss = _rel_mse(out, eps) / ref
                    ent = _entropy(torch.softmax(logits / temp["value"], dim=-1)).mean()
                    loss = data_loss + lam * ent
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    rec = {"stage": "search", "it": it + 1, "loss": float(loss.detach()), "data": float(data_loss.detach()) * ref,
                           "entropy": float(ent.detach()), "temperature": temp["value"]}
                    history.append(rec)
                    progress("search", it + 1, iters, float(data_loss.detach()) * ref)
        _freeze_all(qmodel)
    with torch.no_grad():
        pi = torch.softmax(logits.detach() / temp["value"], dim=-1)
    relaxed = logits.detach().argmax(1) if g > 1 else torch.zeros(n, dtype=torch.int64)  # per-step: uni
    timings["search"] = time.perf_counter() - t0

    # ---- hard partition: drop empty groups, renumber, carry the searched scales -----------
    t0 = time.perf_counter()
    searched = {name: q.scale.detach().clone() for name, q in activation_quantizers(qmodel).items()}
    if cfg.partition == "scale-dp" and 1 < g_max < n:
        order = torch.argsort(data.timesteps)
        names = list(searched)
        logs = torch.stack([searched[k].log() for k in names], 1)[order]  # (N, Q) per-step scales, t order
        weights = step_errors(qmodel, data, cfg.eval_batch)[order] ** 2  # each step's relative MSE
        runs, means = scale_dp_partition(logs, weights, g_max, max(1, int(round(cfg.min_group_fraction * n))))
        labels = torch.empty(n, dtype=torch.int64)
        labels[order] = runs
        step_groups, old_runs = canonical_groups(labels, data.timesteps)
        searched = {k: means[:, j].exp() for j, k in enumerate(names)}
        old_ids = list(old_runs)
    elif cfg.contiguous and learn_partition:
        # argmax constrained to <= G runs of consecutive timesteps; cost = -log softmax(A) at T = 1
        order = torch.argsort(data.timesteps)
        cost = -torch.log_softmax(logits.detach(), dim=-1)[order]
        runs = contiguous_partition(cost, g, min_len=max(1, int(round(cfg.min_group_fraction * n))))
        labels = torch.empty(n, dtype=torch.int64)
        labels[order] = runs
        # each run starts from the searched scales of the group most of its steps chose
        src = [int(torch.mode(relaxed[labels == r]).values) for r in range(int(runs.max()) + 1)]
        step_groups, old_runs = canonical_groups(labels, data.timesteps)
        old_ids = [src[r] for r in old_runs]
    else:
        step_groups, old_ids = canonical_groups(relaxed, data.timesteps)
    table = install_partition(qmodel, data.timesteps, step_groups)
    for name, q in activation_quantizers(qmodel).items():
        q.set_scale(searched[name][old_ids])
    # output quantizers (ort target): statistics of the final groups
    outs = {n_ for n_, q in activation_quantizers(qmodel).items() if q.role == "output" and not q.applies()}
    if outs:
        obs = observe(qmodel, data, cfg.eval_batch, histogram=cfg.output_percentile is not None)
        set_scales_from_observer(qmodel, obs, cfg.output_percentile, names=outs)

    # ---- refinement on each group's own timesteps ------------------------------------------
    if cfg.refine_iters > 0:
        with _frozen_model_params(qmodel):
            scales = _learnable_log_scales(qmodel)
            opt = torch.optim.Adam(scales, lr=cfg.refine_lr)
            with quant_mode(qmodel):
                for it in range(int(cfg.refine_iters)):
                    k = torch.randint(0, n * data.num_items, (cfg.batch_size,), generator=gen)
                    x, t, eps, cond = data.gather(k // data.num_items, k % data.num_items)
                    out = forward_eps(qmodel, x, t, **cond)
                    loss = _rel_mse(out, eps)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    history.append({"stage": "refine", "it": it + 1, "loss": float(loss.detach()), "data": float(loss.detach()),
                                    "entropy": 0.0, "temperature": 0.0})
                    progress("refine", it + 1, int(cfg.refine_iters), float(loss.detach()))
            _freeze_all(qmodel)
    timings["refine"] = time.perf_counter() - t0
    return GroupSearchOutcome(
        step_groups=step_groups,
        table=table,
        calib_timesteps=data.timesteps.clone(),
        pi=pi,
        relaxed_groups=relaxed,
        history=history,
        init_loss=init_loss,
        timings=timings,
    )


__all__ = [
    "CalibSet",
    "GroupSearchConfig",
    "GroupSearchOutcome",
    "Progress",
    "fp_predictions",
    "initial_step_groups",
    "initialize_groups",
    "initialize_uniform",
    "kmeans_step_groups",
    "per_step_log_amax",
    "install_partition",
    "observe",
    "search_groups",
    "searchable_quantizers",
    "set_scales_from_observer",
    "step_errors",
]
