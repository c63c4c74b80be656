"""Calibration from the user's own data: batches of UNet inputs instead of data-free sampling.

Like ModelOpt's `forward_loop`, `calibrate(..., data=...)` takes an iterable (or a callable
returning one) of `(x_t, t)` or `(x_t, t, cond)` batches: the inputs the UNet sees at
timestep(s) `t` while serving. They become a `TrajectorySet`: items are grouped by timestep
(every timestep must have the same number of items, item k of each timestep being the k-th
one seen at it), and the FP model gives each input its noise prediction and predicted clean
image x0_hat, which ADP-DM's SRM and calibration set are built from.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from calibration.trajectories import TrajectorySet, tensor_digest
from engines.errors import AdpdmError
from engines.sampler import predicted_x0
from engines.scheduling import make_scheduler, num_train_timesteps

Batch = tuple  # (x_t, t) or (x_t, t, cond)
UserData = Union[Iterable[Batch], Callable[[], Iterable[Batch]]]


def _tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise AdpdmError(f"{what} must be a tensor or an array of numbers, got {type(value).__name__}") from None


def _batch_parts(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    where = f"calibration data batch {index}"
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise AdpdmError(f"{where}: expected (x_t, t) or (x_t, t, cond), got {type(batch).__name__}")
    x = _tensor(batch[0], f"{where}: x_t")
    if x.ndim != 4 or not x.is_floating_point():
        raise AdpdmError(f"{where}: x_t must be a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    t = _tensor(batch[1], f"{where}: t").reshape(-1)
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise AdpdmError(f"{where}: timesteps must be integers, got {t[:4].tolist()}")
    elif t.dtype == torch.bool or t.is_complex():
        raise AdpdmError(f"{where}: timesteps must be integers, got {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    if t.numel() != x.shape[0]:
        raise AdpdmError(f"{where}: {t.numel()} timesteps for {x.shape[0]} items")
    cond = batch[2] if len(batch) == 3 else None
    if cond is not None and not isinstance(cond, Mapping):
        raise AdpdmError(f"{where}: cond must be a mapping of input name -> tensor, got {type(cond).__name__}")
    out_cond = {}
    for k, v in dict(cond or {}).items():
        v = _tensor(v, f"{where}: condition {k!r}")
        if v.shape[:1] != x.shape[:1]:
            raise AdpdmError(f"{where}: condition {k!r} has {tuple(v.shape)}, not one entry per item ({x.shape[0]})")
        out_cond[k] = v
    return x.detach().float().cpu(), t, out_cond


@torch.no_grad()
def trajectories_from_batches(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    data: UserData,
    *,
    model_sha: str,
    sample_shape: Optional[tuple[int, int, int]] = None,
    batch_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> TrajectorySet:
    """The user's batches as a TrajectorySet (timesteps descending), with FP eps and x0_hat."""
    batches = data() if callable(data) else data
    try:
        iterator = iter(batches)
    except TypeError:
        raise AdpdmError("calibration data must be an iterable of (x_t, t[, cond]) batches or a callable "
                         f"returning one, got {type(batches).__name__}") from None
    t_count = num_train_timesteps(scheduler_config)
    by_t: dict[int, list[tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
    cond_keys: Optional[set[str]] = None
    for i, batch in enumerate(iterator):
        x, t, cond = _batch_parts(batch, i)
        if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
            raise AdpdmError(f"calibration data batch {i}: items of shape {tuple(x.shape[1:])}, the model takes "
                             f"{tuple(sample_shape)}")
        bad = t[(t < 0) | (t >= t_count)]
        if bad.numel():
            raise AdpdmError(f"calibration data batch {i}: timestep {int(bad[0])} outside 0..{t_count - 1}")
        if not torch.isfinite(x).all():
            raise AdpdmError(f"calibration data batch {i}: x_t holds NaN or inf")
        if cond_keys is None:
            cond_keys = set(cond)
        elif set(cond) != cond_keys:
            raise AdpdmError(f"calibration data batch {i}: conditions {sorted(cond)}, earlier batches {sorted(cond_keys)}")
        for j in range(x.shape[0]):
            by_t.setdefault(int(t[j]), []).append((x[j], {k: v[j] for k, v in cond.items()}))
    if not by_t:
        raise AdpdmError("calibration data yielded no batches")
    counts = {t: len(v) for t, v in by_t.items()}
    if len(set(counts.values())) != 1:
        shown = ", ".join(f"t={t}: {n}" for t, n in sorted(counts.items(), reverse=True)[:6])
        raise AdpdmError(f"calibration data must give every timestep the same number of items ({shown})")
    timesteps = sorted(by_t, reverse=True)
    n_items = counts[timesteps[0]]
    conds: dict[str, torch.Tensor] = {}
    for k in sorted(cond_keys or ()):
        first = torch.stack([c[k] for _, c in by_t[timesteps[0]]])
        for t in timesteps[1:]:
            if not torch.equal(torch.stack([c[k] for _, c in by_t[t]]), first):
                raise AdpdmError(f"calibration data: condition {k!r} of item k must be the same at every timestep "
                                 f"(it differs at t={t}); give each timestep its items in the same order")
        conds[k] = first
    x_t = torch.stack([torch.stack([x for x, _ in by_t[t]]) for t in timesteps])  # (N, B, C, H, W)

    scheduler = make_scheduler(scheduler_config, "ddim")
    device = next(unet.parameters()).device
    eps = torch.empty_like(x_t)
    total = len(timesteps) * ((n_items + batch_size - 1) // batch_size)
    done = 0
    for s, t in enumerate(timesteps):
        for lo in range(0, n_items, batch_size):
            sl = slice(lo, min(n_items, lo + batch_size))
            xb = x_t[s, sl].to(device)
            tt = torch.full((xb.shape[0],), t, dtype=torch.int64, device=device)
            kw = {k: v[sl].to(device) for k, v in conds.items()}
            out = unet(xb, tt, **kw)
            eps[s, sl] = (out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out).float().cpu()
            done += 1
            if progress is not None:
                progress(done, total)
    x0_hat = torch.stack([predicted_x0(scheduler, x_t[s], eps[s], t) for s, t in enumerate(timesteps)])
    settings = {
        "source": "user",
        "model_sha256": model_sha,
        "num_samples": n_items,
        "num_steps": len(timesteps),
        "x_t_sha256": tensor_digest(x_t),
        "cond_sha256": {k: tensor_digest(v) for k, v in conds.items()},
    }
    return TrajectorySet(
        timesteps=torch.tensor(timesteps, dtype=torch.int64),
        x_t=x_t,
        eps=eps,
        x0_hat=x0_hat,
        final=x0_hat[-1].clone(),  # the lowest timestep's x0_hat stands in for the sample
        noise=x_t[0].clone(),
        cond=conds,
        settings=settings,
    )
