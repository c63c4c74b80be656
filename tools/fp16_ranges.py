"""Ranges that decide what the FP16 TensorRT target keeps in FP32 (docs/export.md, "High precision").

For MODEL (default: the bundled reference UNet) at timesteps spread over [0, T): the largest |x| and
mean(x^2) at the input of every GroupNorm / LayerNorm (FP16 overflows at 65504, so squares overflow
past |x| = 256), the largest |x| anywhere a Conv / Linear reads, and the largest argument of the
sinusoidal timestep projection (FP16 spacing there). Inputs: N(0, 1) samples, the model's default
conditions. Usage: python tools/fp16_ranges.py [MODEL] [--items 8]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def measure(model: str = "reference", items: int = 8, seed: int = 0) -> dict:
    from adpdm_export.model_loading import load_model

    loaded = load_model(model)
    unet = loaded.unet.eval()
    t_count = int(loaded.num_train_timesteps)
    stats = {"norm_input_max_abs": 0.0, "norm_input_max_mean_square": 0.0, "linear_conv_input_max_abs": 0.0}
    where = {}

    def norm_hook(mod, args, out, name):
        x = args[0].detach().double()
        a, ms = float(x.abs().max()), float((x * x).mean())
        if a > stats["norm_input_max_abs"]:
            stats["norm_input_max_abs"], where["norm_input_max_abs"] = a, name
        stats["norm_input_max_mean_square"] = max(stats["norm_input_max_mean_square"], ms)

    def lin_hook(mod, args, out, name):
        a = float(args[0].detach().abs().max())
        if a > stats["linear_conv_input_max_abs"]:
            stats["linear_conv_input_max_abs"], where["linear_conv_input_max_abs"] = a, name

    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: norm_hook(mod, a, o, n)))
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: lin_hook(mod, a, o, n)))
    g = torch.Generator().manual_seed(seed)
    timesteps = np.linspace(0, t_count - 1, 9).round().astype(int).tolist()
    with torch.no_grad():
        for t in timesteps:
            x = torch.randn((items, *loaded.sample_shape), generator=g)
            cond = loaded.default_condition(items)
            unet(x, torch.full((items,), t, dtype=torch.int64), **cond)
    for h in hooks:
        h.remove()
    # the projection's argument is t * exp(-ln(10000) * i / half): at most T - 1
    stats["timestep_projection_max_argument"] = float(t_count - 1)
    stats["fp16_spacing_at_that_argument"] = float(np.spacing(np.float16(t_count - 1)))
    stats["where"] = where
    stats["timesteps"] = timesteps
    stats["items"] = items
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="reference")
    ap.add_argument("--items", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps(measure(a.model, a.items), indent=1))


if __name__ == "__main__":
    main()
