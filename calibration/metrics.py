"""Quality of a quantized UNet against its FP model, on held-out trajectories.

* noise_rel_l2: per timestep, ||eps_q(x_t) - eps_fp(x_t)|| / ||eps_fp(x_t)|| over the
  held-out batch, with x_t from the FP trajectory (teacher forced); reported per
  timestep and as the mean over timesteps.
* psnr_vs_fp_db: PSNR (data range 2, images in [-1, 1], clamped) of the quantized
  model's final samples vs the FP samples from the same initial noise.
* fd / fd_fp / fd_delta: Frechet distance between a feature extractor's features of
  the samples and real-data statistics, for the quantized and the FP samples (the
  bundled digits classifier for the reference model; the caller supplies both).

Held-out trajectories must come from seeds distinct from the calibration seeds
(`trajectories.heldout_seed`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from calibration.trajectories import TrajectorySet
from engines.sampler import sample
from engines.scheduling import make_scheduler
from engines.torch_predictor import TorchNoisePredictor, module_device

PSNR_CAP_DB = 100.0


@torch.no_grad()
def noise_rel_l2(
    model: nn.Module,
    traj: TrajectorySet,
    batch_size: int = 64,
    steps: Optional[list[int]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """{"timesteps": [...], "rel_l2": [...], "mean": float} of `model` vs the FP eps in `traj`."""
    dev = module_device(model)
    steps = list(range(traj.num_steps)) if steps is None else list(steps)
    n = traj.num_samples
    ts, rel = [], []
    for k, i in enumerate(steps):
        t = int(traj.timesteps[i])
        num = den = 0.0
        for lo in range(0, n, batch_size):
            sl = slice(lo, min(n, lo + batch_size))
            x = traj.x_t[i, sl].to(dev)
            tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=dev)
            cond = {a: v.to(dev) for a, v in traj.cond_for(sl).items()}
            out = model(x, tt, **cond)
            eps_q = (out.sample if hasattr(out, "sample") else out).float().cpu()
            eps_fp = traj.eps[i, sl].float()
            num += float(((eps_q - eps_fp) ** 2).sum())
            den += float((eps_fp**2).sum())
        ts.append(t)
        rel.append(math.sqrt(num / den) if den > 0 else float("nan"))
        if progress is not None:
            progress(k + 1, len(steps))
    finite = [r for r in rel if math.isfinite(r)]
    return {"timesteps": ts, "rel_l2": rel, "mean": sum(finite) / len(finite) if finite else float("nan")}


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB over the whole batch (images clamped to [-1, 1]); capped at PSNR_CAP_DB."""
    a = a.float().clamp(-1, 1)
    b = b.float().clamp(-1, 1)
    mse = float(((a - b) ** 2).mean())
    if mse <= 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(data_range**2 / mse))


@torch.no_grad()
def sample_like(
    model: nn.Module,
    scheduler_config: Mapping[str, Any],
    traj: TrajectorySet,
    batch_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Final samples of `model` from `traj`'s initial noise, conditions, step count and sampler."""
    seed = int(traj.settings.get("seed", 0))
    n, steps = traj.num_samples, traj.num_steps
    predictor = TorchNoisePredictor(model)
    outs = []
    n_batches = (n + batch_size - 1) // batch_size
    for b in range(n_batches):
        sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
        on_step = None
        if progress is not None:
            on_step = lambda i, k, b=b: progress(b * steps + i, n_batches * steps)  # noqa: E731
        scheduler = make_scheduler(scheduler_config, traj.settings.get("sampler", "ddim"))
        out = sample(predictor, scheduler, traj.noise[sl], steps, cond=traj.cond_for(sl), seed=seed, on_step=on_step)
        outs.append(out.images.float().cpu())
    return torch.cat(outs, 0)


def frechet_of(images: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor], real_stats: tuple) -> float:
    from calibration.frechet import feature_stats, frechet_distance

    with torch.no_grad():
        feats = feature_fn(images.float().clamp(-1, 1))
    mu, sigma = feature_stats(feats)
    return float(frechet_distance(mu, sigma, real_stats[0], real_stats[1]))


def evaluate(
    model: nn.Module,
    scheduler_config: Mapping[str, Any],
    heldout: TrajectorySet,
    *,
    feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    real_stats: Optional[tuple] = None,
    batch_size: int = 64,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> dict[str, Any]:
    """All metrics of `model` (a wrapped, calibrated UNet) on the held-out FP trajectories.

    Keys: noise_rel_l2 (mean over timesteps), noise_rel_l2_per_timestep {t: value},
    psnr_vs_fp_db, fd, fd_fp, fd_delta (None without feature_fn / real_stats), num_samples,
    num_steps.
    """
    p_noise = (lambda d, t: progress("noise error", d, t)) if progress else None
    p_samp = (lambda d, t: progress("sampling", d, t)) if progress else None
    nr = noise_rel_l2(model, heldout, batch_size, progress=p_noise)
    images = sample_like(model, scheduler_config, heldout, batch_size, progress=p_samp)
    out: dict[str, Any] = {
        "noise_rel_l2": nr["mean"],
        "noise_rel_l2_per_timestep": {str(t): r for t, r in zip(nr["timesteps"], nr["rel_l2"])},
        "psnr_vs_fp_db": psnr(images, heldout.final),
        "fd": None,
        "fd_fp": None,
        "fd_delta": None,
        "num_samples": heldout.num_samples,
        "num_steps": heldout.num_steps,
    }
    if feature_fn is not None and real_stats is not None:
        out["fd"] = frechet_of(images, feature_fn, real_stats)
        out["fd_fp"] = frechet_of(heldout.final, feature_fn, real_stats)
        out["fd_delta"] = out["fd"] - out["fd_fp"]
    return out
