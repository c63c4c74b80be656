"""A diffusers UNet (torch module) as a noise predictor for the sampler."""

from __future__ import annotations

from typing import Any

import torch

from engines.conditioning import accept_added_cond_inputs


def module_device(module: torch.nn.Module) -> torch.device:
    """Where `module` runs: its parameters' device, or the CPU for a parameter-free wrapper
    (an onnxruntime session behind a module)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class TorchNoisePredictor:
    """Calls `unet(sample, timestep, **cond).sample` without autograd, on the UNet's device."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = accept_added_cond_inputs(unet)  # SDXL: text_embeds / time_ids come as keywords of their own

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        dev = module_device(self.unet)
        cond = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
        out = self.unet(sample.to(dev), timestep.to(dev), **cond)
        out = out.sample if hasattr(out, "sample") else out
        return out.to("cpu", torch.float32)
