"""Per-output-channel symmetric weight scales with the clipping chosen by MSE search."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from calibration.quantizers import fake_quant, qrange, scale_from_amax


@torch.no_grad()
def mse_clip_scales(w: torch.Tensor, bits: int, grid: int = 80, min_ratio: float = 0.3) -> torch.Tensor:
    """Per-channel (axis 0) scales minimizing ||w - Q(w)||^2 over clipping ratios.

    Candidates: clipping ratios r in [min_ratio, 1] of each channel's max-abs, with
    scale = r * amax / (2**(b-1) - 1), searched coarse to fine to a resolution of
    (1 - min_ratio) / grid: about sqrt(grid) coarse ratios, then the same number
    around each channel's best. Ties keep the larger ratio (1.0 = plain max-abs).
    """
    w2 = w.detach().reshape(w.shape[0], -1).to(torch.float32)
    amax = w2.abs().amax(1)
    best_ratio = torch.ones_like(amax)
    best_scale = scale_from_amax(amax, bits)
    if grid <= 1:
        return best_scale.cpu()
    best_err = ((fake_quant(w2, best_scale[:, None], bits) - w2) ** 2).sum(1)
    span = 1.0 - float(min_ratio)
    n_coarse = max(2, int(round(grid ** 0.5)))
    coarse_step = span / (n_coarse - 1)
    fine_step = span / grid

    def consider(r: torch.Tensor) -> None:
        nonlocal best_err, best_scale, best_ratio
        s = scale_from_amax(amax * r, bits).to(w2.device)
        err = ((fake_quant(w2, s[:, None], bits) - w2) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        best_ratio = torch.where(better, r, best_ratio)

    for k in range(1, n_coarse):
        consider(torch.full_like(amax, 1.0 - k * coarse_step))
    centre = best_ratio.clone()
    n_fine = int(coarse_step / fine_step)
    for k in range(-n_fine, n_fine + 1):
        if k == 0:
            continue
        r = (centre + k * fine_step).clamp(float(min_ratio), 1.0)
        consider(r)
    return best_scale.cpu()


def maxabs_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    return scale_from_amax(w.detach().reshape(w.shape[0], -1).abs().amax(1), bits).cpu()


@torch.no_grad()
def calibrate_weights(
    qmodel: nn.Module,
    search: bool = True,
    grid: int = 80,
    min_ratio: float = 0.3,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, torch.Tensor]:
    """Set every weight quantizer of a wrapped model; returns name -> scales (C_out,)."""
    from calibration.quant_unet import quantized_layers

    layers = quantized_layers(qmodel)
    out = {}
    for i, (name, layer) in enumerate(layers.items()):
        wq = layer.weight_quantizer
        s = mse_clip_scales(layer.weight, wq.bits, grid, min_ratio) if search else maxabs_scales(layer.weight, wq.bits)
        wq.set_scale(s)
        out[wq.qname] = wq.scale.detach().cpu().clone()
        if progress is not None:
            progress(i + 1, len(layers))
    return out


__all__ = ["mse_clip_scales", "maxabs_scales", "calibrate_weights", "qrange"]
