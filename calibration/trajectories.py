"""Data-free calibration trajectories: the FP model samples from seeded noise (DDIM).

Every step keeps the UNet input x_t, its noise prediction eps and the predicted clean
image x0_hat, for B seeds (item i uses seed `seed + i`, drawn alone so a seed's noise
does not depend on B). Held-out trajectories for metrics use `heldout_seed(seed)`, far
from any calibration seed.

Results are cached on disk as safetensors keyed by a hash of everything that decides
them (model sha256, scheduler config, sampler, steps, seeds, conditions, sample shape,
format version); a cached file is used only if its stored settings equal the request
exactly, and a corrupt one is regenerated. Generation is batched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from calibration.configs import DEFAULT_SAMPLES, DEFAULT_STEPS
from calibration.fingerprint import model_sha256
from calibration.sampling_precision import autocast
from engines.errors import AdpdmError
from engines.file_io import atomic_write, sha256_json
from engines.sampler import check_guidance, initial_noise, interleave, sample
from engines.scheduling import make_scheduler
from engines.torch_predictor import TorchNoisePredictor, module_device

FORMAT_VERSION = 2  # 2: DDIM re-derives eps from a clipped x0 (engines.sampler.scheduler_step_kwargs)
SAMPLER = "ddim"
HELDOUT_SEED_OFFSET = 1_000_003
DEFAULT_BATCH_SIZE = 64  # UNet batch of every calibration pass (sampling, statistics, ADP-DM's search)


def heldout_seed(seed: int) -> int:
    """Base seed of held-out (metric) trajectories, distinct from calibration seeds seed..seed+B-1."""
    return int(seed) + HELDOUT_SEED_OFFSET


@dataclass
class TrajectorySet:
    """x_t / eps / x0_hat: (N, B, C, H, W); timesteps (N,) descending; final (B, C, H, W)."""

    timesteps: torch.Tensor
    x_t: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor
    final: torch.Tensor
    noise: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def num_samples(self) -> int:
        """UNet items per step (with guidance: two per seed, see `guided`)."""
        return int(self.x_t.shape[1])

    @property
    def guided(self) -> bool:
        """Sampled with classifier-free guidance: item 2j is seed j's unconditional half, 2j + 1 its
        conditional one (engines.sampler.Trajectory); `final` and `noise` have one entry per seed."""
        return float(self.settings.get("guidance_scale", 1.0)) > 1.0

    @property
    def seeds(self) -> list[int]:
        """The noise seed of each item (`generate_trajectories` draws sample j from seed + j)."""
        base = int(self.settings.get("seed", 0))
        per = 2 if self.guided else 1
        return [base + i // per for i in range(self.num_samples)]

    def cond_for(self, idx: slice | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if idx is None:
            return dict(self.cond)
        return {k: v[idx] for k, v in self.cond.items()}


# ----------------------------------------------------------------------------------------
# conditions
# ----------------------------------------------------------------------------------------
def expand_cond(cond: Optional[Mapping[str, Any]], n: int) -> dict[str, torch.Tensor]:
    """User conditions (each a tensor whose first dim K lists K conditions) cycled to n items.

    `class_labels`: int tensor (K,); `encoder_hidden_states`: float tensor (K, L, D).
    A tensor with a leading dim of 1 is repeated; K conditions are used in turn.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in (cond or {}).items():
        if v is None:
            continue
        t = torch.as_tensor(v)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.shape[0] == 0:
            raise AdpdmError(f"condition {k!r} is empty")
        idx = torch.arange(n) % t.shape[0]
        out[k] = t[idx].clone()
    return out


def unet_sample_shape(unet: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(unet, "config", None)
    if cfg is None:
        raise AdpdmError("cannot tell the sample shape of this UNet; pass sample_shape")
    size = cfg.sample_size
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return (int(cfg.in_channels), *size)


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trajectory_settings(
    model_sha: str,
    scheduler_config: Mapping[str, Any],
    num_samples: int,
    num_steps: int,
    seed: int,
    cond: Mapping[str, torch.Tensor],
    sample_shape: tuple[int, int, int],
    unet_config: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """What decides a trajectory set, as its cache key. The weights' hash does not cover the UNet's
    config (the same weights with another norm_eps or head layout are another model), so it is in too."""
    def plain(config: Mapping[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        return json.loads(json.dumps(kept, sort_keys=True, default=str))

    return {
        "format_version": FORMAT_VERSION,
        "model_sha256": model_sha,
        "unet_config": plain(unet_config or {}),
        "scheduler_config": plain(scheduler_config),
        "sampler": SAMPLER,
        "num_steps": int(num_steps),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "cond": {k: tensor_digest(v) for k, v in sorted(cond.items())},
        "sample_shape": list(sample_shape),
    }


def settings_key(settings: Mapping[str, Any]) -> str:
    return sha256_json(settings)


# ----------------------------------------------------------------------------------------
# generation and cache
# ----------------------------------------------------------------------------------------
def _seeded_noise(num: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    return torch.cat([initial_noise(1, shape, seed + i) for i in range(num)], 0)


@torch.no_grad()
def generate_trajectories(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    *,
    num_samples: int = DEFAULT_SAMPLES,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    cond: Optional[Mapping[str, Any]] = None,
    sample_shape: Optional[tuple[int, int, int]] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Optional[str | os.PathLike] = None,
    model_sha: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[Mapping[str, Any]] = None,
    precision: str = "fp32",
) -> TrajectorySet:
    """Sample `num_samples` seeds with the FP `unet` (on its own device) and DDIM `num_steps`.

    `cond`: user conditions (see `expand_cond`) or None (unconditional / null). With
    guidance_scale > 1, `uncond` (e.g. the negative prompt's embeddings, cycled like `cond`)
    gives classifier-free guidance and the set holds both halves the UNet sees (TrajectorySet.guided).
    precision: the FP model's forward in fp32, or fp16 / bf16 under autocast (check it on the
    model first: calibration.sampling_precision.check_precision); the stored set is FP32.
    With `cache_dir`, a matching cached set is returned instead of sampling again.
    `progress(done, total)` counts UNet calls.
    """
    if int(num_samples) < 1:
        raise AdpdmError(f"calibration samples must be >= 1, got {num_samples}")
    if int(num_steps) < 1:
        raise AdpdmError(f"calibration steps must be >= 1, got {num_steps}")
    num_samples, num_steps = int(num_samples), int(num_steps)
    shape = tuple(sample_shape) if sample_shape else unet_sample_shape(unet)
    conds = expand_cond(cond, num_samples)
    scale = check_guidance(guidance_scale)
    unconds = expand_cond(uncond, num_samples) if scale > 1.0 else {}
    if scale > 1.0 and set(unconds) != set(conds):
        raise AdpdmError(f"guidance needs unconditional inputs for {sorted(conds)}, got {sorted(unconds)}")
    sha = model_sha or model_sha256(unet)
    settings = trajectory_settings(sha, scheduler_config, num_samples, num_steps, seed, conds, shape,
                                   unet_config=getattr(unet, "config", None))
    if scale > 1.0:  # unguided keys stay as they were (existing caches remain valid)
        settings["guidance_scale"] = scale
        settings["uncond"] = {k: tensor_digest(v) for k, v in sorted(unconds.items())}
    with_autocast = autocast(precision, module_device(unet))  # checks the name too
    if precision != "fp32":  # as guidance: FP32 keys stay as they were
        settings["precision"] = precision
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"trajectories-{settings_key(settings)[:32]}.safetensors"
        cached = load_trajectories(path, expected_settings=settings)
        if cached is not None:
            if progress is not None:
                progress(1, 1)
            return cached
    scheduler = make_scheduler(scheduler_config, SAMPLER)
    predictor = TorchNoisePredictor(unet)
    noise = _seeded_noise(num_samples, shape, int(seed))
    parts = []
    if scale > 1.0:  # two UNet items per seed: keep the UNet batch (and its memory) at batch_size
        batch_size = max(1, batch_size // 2)
    n_batches = (num_samples + batch_size - 1) // batch_size
    total = n_batches * num_steps
    for b in range(n_batches):
        sl = slice(b * batch_size, min(num_samples, (b + 1) * batch_size))
        on_step = None
        if progress is not None:
            on_step = lambda i, n, b=b: progress(b * num_steps + i, total)  # noqa: E731
        with with_autocast:
            out = sample(
                predictor,
                scheduler,
                noise[sl],
                num_steps,
                cond={k: v[sl] for k, v in conds.items()},
                keep_trajectory=True,
                seed=int(seed),
                on_step=on_step,
                guidance_scale=scale,
                uncond={k: v[sl] for k, v in unconds.items()} or None,
            )
        parts.append(out)
    trajs = [p.trajectory for p in parts]
    ts = TrajectorySet(
        timesteps=trajs[0].timesteps.clone(),
        x_t=torch.cat([t.x_t for t in trajs], 1),
        eps=torch.cat([t.eps for t in trajs], 1),
        x0_hat=torch.cat([t.x0_hat for t in trajs], 1),
        final=torch.cat([p.images for p in parts], 0).to(torch.float32).cpu(),
        noise=noise,
        cond={k: interleave(unconds[k], v) for k, v in conds.items()} if scale > 1.0 else conds,
        settings=settings,
    )
    if path is not None:
        save_trajectories(ts, path)
    return ts


def save_trajectories(ts: TrajectorySet, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) with the settings in the safetensors metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        "timesteps": ts.timesteps.contiguous(),
        "x_t": ts.x_t.contiguous(),
        "eps": ts.eps.contiguous(),
        "x0_hat": ts.x0_hat.contiguous(),
        "final": ts.final.contiguous(),
        "noise": ts.noise.contiguous(),
    }
    for k, v in ts.cond.items():
        tensors[f"cond.{k}"] = v.contiguous()
    metadata = {"settings": json.dumps(ts.settings, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_trajectories(path: str | os.PathLike, expected_settings: Optional[Mapping[str, Any]] = None) -> Optional[TrajectorySet]:
    """A cached set, or None when absent, unreadable (warned) or made with other settings."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        settings = json.loads(meta["settings"])
    except Exception as e:  # truncated or foreign file: regenerate rather than trust it
        warnings.warn(f"ignoring unreadable trajectory cache {path}: {type(e).__name__}: {e}", stacklevel=2)
        return None
    if expected_settings is not None and settings != json.loads(json.dumps(dict(expected_settings), sort_keys=True)):
        return None
    need = ("timesteps", "x_t", "eps", "x0_hat", "final", "noise")
    if any(k not in tensors for k in need):
        warnings.warn(f"ignoring incomplete trajectory cache {path}", stacklevel=2)
        return None
    n, b = tensors["x_t"].shape[:2]
    per = 2 if float(settings.get("guidance_scale", 1.0)) > 1.0 else 1
    if tensors["timesteps"].numel() != n or tensors["final"].shape[0] * per != b:
        warnings.warn(f"ignoring inconsistent trajectory cache {path}", stacklevel=2)
        return None
    return TrajectorySet(
        timesteps=tensors["timesteps"],
        x_t=tensors["x_t"],
        eps=tensors["eps"],
        x0_hat=tensors["x0_hat"],
        final=tensors["final"],
        noise=tensors["noise"],
        cond={k[5:]: v for k, v in tensors.items() if k.startswith("cond.")},
        settings=settings,
        from_cache=True,
    )


def default_cache_dir() -> Path:
    """$ADPDM_CACHE_DIR/trajectories, else ~/.cache/adpdm/trajectories."""
    base = os.environ.get("ADPDM_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "adpdm"
    return root / "trajectories"
