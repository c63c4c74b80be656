"""Quality of a quantized UNet against its FP model, on held-out trajectories.

* noise_rel_l2: per timestep, ||eps_q(x_t) - eps_fp(x_t)|| / ||eps_fp(x_t)|| over the
  held-out batch, with x_t from the FP trajectory (teacher forced); reported per
  timestep and as the mean over timesteps (the *pooled* figure).
* noise_rel_l2 per sample: the same ratio per held-out item, averaged over timesteps; its
  median, 90th percentile and max over the items. Quality targets are judged on the
  per-sample median: one item whose FP trajectory leaves the data range can dominate the
  pooled figure (its eps are large and so are its errors), never the median.
* off-range trajectories: FP trajectories whose |x_t| exceeds sqrt(abar_t) * R + sqrt(1 - abar_t) * 6
  at some step (R: the data range, the scheduler's clip_sample_range, else the median over items
  of max |final sample|; 6: a six-sigma noise value), with their seeds.
* psnr_vs_fp_db: PSNR (data range 2, images in [-1, 1], clamped) of the quantized
  model's final samples vs the FP samples from the same initial noise (over the batch, and
  per sample: median and min).
* fd / fd_fp / fd_delta: Frechet distance between a feature extractor's features of
  the samples and real-data statistics, for the quantized and the FP samples (the
  bundled digits classifier for the reference model; the caller supplies both).
* prompt fidelity (text-conditional digits, `reference-text`): calibration/prompt_fidelity.py.
* guided held-out sets (classifier-free guidance) are sampled with their guidance scale; a
  latent pipeline's samples are decoded (the caller's `decode`) before PSNR, FD and fidelity.

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
    item_rel = torch.zeros(len(steps), n, dtype=torch.float64)  # per step, per item
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
            err = ((eps_q - eps_fp) ** 2).flatten(1).sum(1).double()
            ref = (eps_fp**2).flatten(1).sum(1).double()
            item_rel[k, sl] = (err / ref.clamp_min(1e-30)).sqrt()
            num += float(err.sum())
            den += float(ref.sum())
        ts.append(t)
        rel.append(math.sqrt(num / den) if den > 0 else float("nan"))
        if progress is not None:
            progress(k + 1, len(steps))
    finite = [r for r in rel if math.isfinite(r)]
    return {"timesteps": ts, "rel_l2": rel, "mean": sum(finite) / len(finite) if finite else float("nan"),
            "per_sample": item_rel.mean(0).tolist()}


def per_sample_summary(values, seeds: Optional[list[int]] = None) -> dict[str, Any]:
    """noise_rel_l2_median / _p90 / _max over per-sample values (and _max_seed, the seed of the max)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    worst = int(v.argmax())
    out = {"noise_rel_l2_median": float(v.median()), "noise_rel_l2_p90": float(torch.quantile(v, 0.9)),
           "noise_rel_l2_max": float(v[worst])}
    if seeds is not None:
        out["noise_rel_l2_max_seed"] = int(seeds[worst])
    return out


def off_range_items(traj: TrajectorySet, scheduler_config: Mapping[str, Any], sigmas: float = 6.0) -> list[int]:
    """Items whose FP trajectory leaves the data range at some step (see the module docstring)."""
    if traj.num_samples == 0:
        return []
    abar = make_scheduler(scheduler_config, "ddim").alphas_cumprod.double()
    ab = abar[traj.timesteps.long()].view(-1, 1)  # (N, 1)
    if scheduler_config.get("clip_sample", False):
        data_range = float(scheduler_config.get("clip_sample_range", 1.0))
    else:
        data_range = float(traj.final.abs().flatten(1).amax(1).median())
    peak = traj.x_t.abs().flatten(2).amax(2).double()  # (N, B)
    bound = ab.sqrt() * data_range + (1 - ab).sqrt() * sigmas
    return (peak > bound).any(0).nonzero().flatten().tolist()


def trajectory_report(traj: TrajectorySet, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """off_range_count / off_range_seeds of the held-out FP trajectories."""
    items = off_range_items(traj, scheduler_config)
    seeds = traj.seeds
    return {"off_range_count": len(items), "off_range_seeds": [seeds[i] for i in items]}


def noise_report(model: nn.Module, heldout: TrajectorySet, scheduler_config: Mapping[str, Any], batch_size: int = 64,
                 progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """The noise-error keys every quality report carries: noise_rel_l2 (pooled), the per-sample
    summary, noise_rel_l2_per_timestep and the off-range FP trajectories of `heldout`."""
    nr = noise_rel_l2(model, heldout, batch_size, progress=progress)
    return {
        "noise_rel_l2": nr["mean"],
        **per_sample_summary(nr["per_sample"], heldout.seeds),
        "noise_rel_l2_per_timestep": {str(t): r for t, r in zip(nr["timesteps"], nr["rel_l2"])},
        **trajectory_report(heldout, scheduler_config),
    }


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
    """Final samples of `model` from `traj`'s initial noise, conditions, step count and sampler; a guided
    set is sampled with its guidance scale and each seed's two halves (item 2j unconditional, 2j + 1
    conditional), as the FP model sampled it."""
    seed = int(traj.settings.get("seed", 0))
    n, steps = int(traj.noise.shape[0]), traj.num_steps  # seeds (a guided set has two UNet items each)
    scale = float(traj.settings.get("guidance_scale", 1.0)) if traj.guided else 1.0
    predictor = TorchNoisePredictor(model)
    outs = []
    n_batches = (n + batch_size - 1) // batch_size
    for b in range(n_batches):
        sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
        on_step = None
        if progress is not None:
            on_step = lambda i, k, b=b: progress(b * steps + i, n_batches * steps)  # noqa: E731
        scheduler = make_scheduler(scheduler_config, traj.settings.get("sampler", "ddim"))
        cond, uncond = traj.cond_for(sl), None
        if traj.guided:
            both = traj.cond_for(slice(2 * sl.start, 2 * sl.stop))
            cond, uncond = {k: v[1::2] for k, v in both.items()}, {k: v[0::2] for k, v in both.items()}
        out = sample(predictor, scheduler, traj.noise[sl], steps, cond=cond, seed=seed, on_step=on_step,
                     guidance_scale=scale, uncond=uncond)
        outs.append(out.images.float().cpu())
    return torch.cat(outs, 0)


def psnr_per_sample(a: torch.Tensor, b: torch.Tensor, seeds: Optional[list[int]] = None,
                    data_range: float = 2.0) -> dict[str, Any]:
    """psnr_vs_fp_db_median / _min (+ _min_seed): PSNR of each image pair, so one ruined sample
    shows instead of being averaged into the batch figure (capped at PSNR_CAP_DB)."""
    a = a.float().clamp(-1, 1)
    b = b.float().clamp(-1, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    db = (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-300))).clamp(max=PSNR_CAP_DB)
    worst = int(db.argmin())
    out = {"psnr_vs_fp_db_median": float(db.median()), "psnr_vs_fp_db_min": float(db[worst])}
    if seeds is not None:
        out["psnr_vs_fp_db_min_seed"] = int(seeds[worst])
    return out


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
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    labels: Optional[list[int]] = None,
) -> dict[str, Any]:
    """All metrics of `model` (a wrapped, calibrated UNet) on the held-out FP trajectories.

    Keys: noise_rel_l2 (pooled, mean over timesteps), noise_rel_l2_median / _p90 / _max /
    _max_seed (per sample), noise_rel_l2_per_timestep {t: value}, psnr_vs_fp_db (batch) and
    psnr_vs_fp_db_median / _min / _min_seed (per sample), fd, fd_fp, fd_delta (None without
    feature_fn / real_stats), off_range_count, off_range_seeds, num_samples (UNet items per
    step), num_seeds, num_steps. Guided sets are sampled with their guidance (sample_like).
    decode: latents -> images in [-1, 1] (a latent pipeline's VAE), applied to the quantized and FP
    samples before PSNR, FD and fidelity. classifier + labels (the digit each seed's prompt asks
    for): the prompt fidelity keys of both models (calibration.prompt_fidelity.compare_fidelity).
    """
    p_noise = (lambda d, t: progress("noise error", d, t)) if progress else None
    p_samp = (lambda d, t: progress("sampling", d, t)) if progress else None
    noise = noise_report(model, heldout, scheduler_config, batch_size, progress=p_noise)
    images = sample_like(model, scheduler_config, heldout, batch_size, progress=p_samp)
    fp_images = heldout.final
    if decode is not None:
        images, fp_images = decode(images), decode(fp_images)
    seeds = sorted(set(heldout.seeds))
    out: dict[str, Any] = {
        **noise,
        "psnr_vs_fp_db": psnr(images, fp_images),
        **psnr_per_sample(images, fp_images, seeds),
        "fd": None,
        "fd_fp": None,
        "fd_delta": None,
        "num_samples": heldout.num_samples,
        "num_seeds": len(seeds),
        "num_steps": heldout.num_steps,
    }
    if feature_fn is not None and real_stats is not None:
        out["fd"] = frechet_of(images, feature_fn, real_stats)
        out["fd_fp"] = frechet_of(fp_images, feature_fn, real_stats)
        out["fd_delta"] = out["fd"] - out["fd_fp"]
    if classifier is not None and labels is not None:
        from calibration.prompt_fidelity import compare_fidelity

        out.update(compare_fidelity(classifier, images, fp_images, labels, seeds))
    return out
