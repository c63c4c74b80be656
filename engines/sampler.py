"""The sampling loop: a diffusers scheduler driven by any noise predictor.

A noise predictor is any callable `predict(sample, timestep, **cond) -> eps`
taking a float32 (B, C, H, W) tensor and an int64 (B,) tensor of timestep
*values*; a torch UNet, an onnxruntime session or a TensorRT engine all fit.
The same loop serves image generation, calibration trajectories and metrics.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

import torch

from engines.errors import AdpdmError


class NoisePredictor(Protocol):
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor: ...


@dataclass
class Trajectory:
    """Every step of a sampling run, kept for calibration and metrics.

    `x_t[i]` is the UNet input at `timesteps[i]`, `eps[i]` its noise prediction
    and `x0_hat[i]` the predicted clean image at that step (shapes (N, B, C, H, W)).
    With classifier-free guidance every sample is two UNet items, interleaved (2j: the
    unconditional half, 2j + 1: the conditional half; shapes (N, 2B, ...)): `eps` holds each
    half's own output, `x0_hat` the guided prediction the sampler follows (the same for both).
    """

    timesteps: torch.Tensor
    x_t: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor


@dataclass
class SampleOutput:
    images: torch.Tensor  # (B, C, H, W), model space (usually [-1, 1])
    trajectory: Optional[Trajectory] = None


MAX_SEED = 2**63 - 2**32  # torch seeds are 64-bit; room for the per-item and scheduler offsets


def check_seed(seed: int) -> int:
    """A seed every generator here accepts, with its offsets (seed + item, seed + 1), or one clear error."""
    try:
        value = operator.index(seed)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise AdpdmError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return int(value)


def check_steps(scheduler, num_steps: int) -> int:
    """A step count the scheduler can take (at least 1, at most its training timesteps), or one clear error."""
    limit = int(getattr(scheduler.config, "num_train_timesteps", 1000))
    if not 1 <= int(num_steps) <= limit:
        raise AdpdmError(f"steps must be in 1..{limit} (the scheduler's training timesteps), got {num_steps}")
    return int(num_steps)


def initial_noise(batch: int, shape: tuple[int, int, int], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Seeded Gaussian noise drawn on the CPU, so every backend starts from the same bits."""
    gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    return torch.randn((batch, *shape), generator=gen, dtype=dtype)


def predicted_x0(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, timestep: int) -> torch.Tensor:
    """x0_hat from the model output at one timestep, for epsilon / v / sample prediction."""
    abar = scheduler.alphas_cumprod[int(timestep)].to(x_t.dtype).to(x_t.device)
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * model_output
    if kind == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {kind!r}")


MAX_GUIDANCE_SCALE = 1e6  # far above any useful scale; bounds what a request or a config may ask


def check_guidance(guidance_scale: Any) -> float:
    """A classifier-free guidance scale: a number in [1, 1e6] (1: no guidance), or one AdpdmError line.
    The one rule: `DataFreeConfig`, `adpdm sample`, the servers and this sampler all call it."""
    try:
        if isinstance(guidance_scale, bool):
            raise TypeError
        g = float(guidance_scale)
    except (TypeError, ValueError, OverflowError):
        g = float("nan")
    if not 1.0 <= g <= MAX_GUIDANCE_SCALE:
        raise AdpdmError(f"guidance scale must be a number from 1 (no guidance) to {MAX_GUIDANCE_SCALE:g}, "
                         f"got {guidance_scale!r}")
    return g


def interleave(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """(B, ...) and (B, ...) -> (2B, ...): item 2j the unconditional, 2j + 1 the conditional one."""
    return torch.stack([uncond, cond], dim=1).reshape(-1, *cond.shape[1:])


def scheduler_step_kwargs(scheduler, generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """The keyword arguments this loop passes to `scheduler.step`.

    Where the scheduler clips (or thresholds) its predicted x0, the noise prediction is re-derived
    from the clipped x0 (DDIM's `use_clipped_model_output=True`, as GLIDE does). diffusers' DDIM
    default keeps the raw prediction beside the clipped x0; the step is then inconsistent, and with
    the bundled model's `clip_sample: true` at 100 DDIM steps 34 of 256 seeds drift off the data
    range (|x_t| up to 22, FD 45.8 against 34.8 re-derived; docs/method.md, "Sampler").
    To match this loop, call a diffusers DDIMPipeline with `use_clipped_model_output=True`.
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"generator": generator} if "generator" in params else {}
    config = scheduler.config
    if "use_clipped_model_output" in params and (getattr(config, "clip_sample", False) or getattr(config, "thresholding", False)):
        kwargs["use_clipped_model_output"] = True
    return kwargs


@torch.no_grad()
def sample(
    predictor: NoisePredictor,
    scheduler,
    noise: torch.Tensor,
    num_steps: int,
    cond: Optional[Mapping[str, Any]] = None,
    keep_trajectory: bool = False,
    seed: int = 0,
    on_step: Optional[Callable[[int, int], None]] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[Mapping[str, Any]] = None,
) -> SampleOutput:
    """Run `num_steps` scheduler steps from `noise` and return the final sample.

    `seed` seeds the scheduler's own noise (DDPM, DDIM with eta > 0), so stochastic
    samplers are reproducible too. `on_step(i, num_steps)` reports progress.
    guidance_scale > 1 with `uncond` (the unconditional inputs, e.g. the negative prompt's
    embeddings, one per item): classifier-free guidance, eps = eps_u + s (eps_c - eps_u), both
    halves in one predictor call of 2B items (interleaved, see Trajectory).
    """
    cond = dict(cond or {})
    scale = check_guidance(guidance_scale)
    guided = scale > 1.0
    if guided:
        if not uncond:
            raise AdpdmError("classifier-free guidance needs the unconditional inputs (uncond)")
        if set(uncond) != set(cond):
            raise AdpdmError(f"uncond has inputs {sorted(uncond)}, cond {sorted(cond)}: give the same ones")
        for k, v in cond.items():
            if tuple(torch.as_tensor(uncond[k]).shape) != tuple(torch.as_tensor(v).shape):
                raise AdpdmError(f"{k}: the unconditional inputs have shape {tuple(torch.as_tensor(uncond[k]).shape)}, "
                                 f"the conditional ones {tuple(torch.as_tensor(v).shape)}: they must match")
        cond = {k: interleave(torch.as_tensor(uncond[k]), torch.as_tensor(v)) for k, v in cond.items()}
    scheduler.set_timesteps(check_steps(scheduler, num_steps))
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    x = noise.to(torch.float32) * scheduler.init_noise_sigma
    step_kwargs = scheduler_step_kwargs(scheduler, gen)
    batch = x.shape[0]
    xs, epss, x0s, ts = [], [], [], []
    for i, t in enumerate(scheduler.timesteps):
        t_int = int(t)
        model_in = scheduler.scale_model_input(x, t)
        unet_in = interleave(model_in, model_in) if guided else model_in
        tt = torch.full((unet_in.shape[0],), t_int, dtype=torch.int64)
        raw = predictor(unet_in, tt, **cond).to(torch.float32)
        if guided:
            halves = raw.reshape(batch, 2, *raw.shape[1:])
            out = halves[:, 0] + scale * (halves[:, 1] - halves[:, 0])
        else:
            out = raw
        if keep_trajectory:
            xs.append(unet_in.clone())
            epss.append(raw.clone())
            x0 = predicted_x0(scheduler, model_in, out, t_int)
            x0s.append(interleave(x0, x0) if guided else x0)
            ts.append(t_int)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        if on_step is not None:
            on_step(i + 1, len(scheduler.timesteps))
    traj = None
    if keep_trajectory:
        traj = Trajectory(
            timesteps=torch.tensor(ts, dtype=torch.int64),
            x_t=torch.stack(xs),
            eps=torch.stack(epss),
            x0_hat=torch.stack(x0s),
        )
    return SampleOutput(images=x, trajectory=traj)
