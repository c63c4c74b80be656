"""The precision the FP model samples its calibration trajectories in, and the check that it is safe.

Sampling the trajectories is most of the FP model's work in a data-free calibration (64 seeds x
100 steps by default). `fp16` / `bf16` run it under `torch.autocast`: convolutions and matmuls in
half precision, and what torch's autocast lists keep in FP32 on that device (on CUDA the
normalisations, softmax, exp/log and the reductions) stays there. Only the sampling changes (the
range statistics observed while sampling see its half-precision activations): the scheduler's
arithmetic, the stored trajectories and every fake-quantized forward of the method (SRM, the
search) stay FP32.

"Where it is safe" is decided per model, before any sampling: `check_precision` runs a probe
batch (seeded noise at timesteps spread over [0, T), the calibration's own conditions) in FP32 and
under autocast and compares the noise predictions. A non-finite output or a relative L2 error
above `PROBE_TOLERANCE` on any probe item falls back to FP32, with the reason said; the check is
recorded in the calibration settings either way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, ContextManager, Mapping, Optional

import torch
from torch import nn

from calibration.configs import SAMPLING_PRECISIONS
from engines.errors import AdpdmError
from engines.torch_predictor import TorchNoisePredictor, module_device

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Largest relative L2 error of a probe item's noise prediction (half vs FP32) that is accepted.
# Measured here (CPU autocast; docs/method.md, "Sampling in half precision"): bf16 0.003-0.012 and
# fp16 0.0004-0.0015 at the worst item on the reference models and random-weight 35.7M / SD-1.5
# UNets, and on the reference model bf16 / fp16 sampling left the calibrated model's per-sample
# error where FP32 sampling puts it. 0.02 is about the size of the W8A8 error the calibration
# serves (0.0095-0.028 median per sample on the reference model): a forward off by more would
# move the calibration data by as much as quantization moves the model.
PROBE_TOLERANCE = 0.02
PROBE_ITEMS = 4


def check_name(precision: str) -> str:
    if precision not in SAMPLING_PRECISIONS:
        raise AdpdmError(f"sampling precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The context the FP model samples in: nothing for fp32, torch.autocast for fp16 / bf16."""
    if check_name(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@dataclass(frozen=True)
class PrecisionCheck:
    """What was asked, what sampling runs in, and why (the probe's worst relative error)."""

    requested: str
    used: str
    probe_rel_l2_max: Optional[float] = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def check_precision(unet: nn.Module, precision: str, num_train_timesteps: int, sample_shape: tuple[int, ...], *,
                    seed: int = 0, cond: Optional[Mapping[str, torch.Tensor]] = None) -> PrecisionCheck:
    """Whether `unet` may sample in `precision` (module doc); fp32 needs no probe.

    cond: PROBE_ITEMS items of each condition (calibration.trajectories.expand_cond)."""
    if check_name(precision) == "fp32":
        return PrecisionCheck("fp32", "fp32")
    dev = module_device(unet)
    if precision == "fp16" and dev.type == "cpu":
        # allowed (and checked), but slower than FP32 on the CPU measured: say so rather than surprise
        note = "fp16 was slower than fp32 on the CPU measured (docs/method.md; bf16 is the CPU's half type); "
    else:
        note = ""
    predictor = TorchNoisePredictor(unet)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((PROBE_ITEMS, *sample_shape), generator=gen)
    # both ends of the schedule: the noisiest input and the nearly clean one
    t = torch.linspace(num_train_timesteps - 1, 0, PROBE_ITEMS).round().to(torch.int64)
    c = dict(cond or {})
    ref = predictor(x, t, **c)
    with autocast(precision, dev):
        low = predictor(x, t, **c)
    if not bool(torch.isfinite(low).all()):
        return PrecisionCheck(precision, "fp32", None,
                              note + f"{precision} gives non-finite noise predictions on this model; sampling in fp32")
    err = ((low - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)).max().item()
    if not math.isfinite(err) or err > PROBE_TOLERANCE:
        return PrecisionCheck(precision, "fp32", err,
                              note + f"{precision} is off FP32 by {err:.4f} (relative L2, worst probe item; the limit "
                              f"is {PROBE_TOLERANCE}) on this model; sampling in fp32")
    return PrecisionCheck(precision, precision, err,
                          note + f"sampling in {precision}: {err:.4f} relative L2 from FP32 at the worst probe item")
