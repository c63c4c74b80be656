"""Peer quantizers for tools/bench_quality.py and tools/bench_speed/: the tools a user would
pick instead of adpdm (onnxruntime quantize_static, NVIDIA ModelOpt, torchao PT2E, optimum-quanto).

Every peer gets the same calibration budget (`CalibData`: the (x_t, t) pairs of the FP
sampler's calibration trajectories, the very pairs our methods calibrate on) and the same
scope (`Scope`: per-tensor inputs of Conv2d/Linear, per-channel weights, the same layers kept
FP). A peer module exposes

    NAME: str                                   # e.g. "ort-static"
    VARIANTS: dict[str, str]                    # variant -> one-line description
    BITS: tuple[str, ...]                       # e.g. ("W8A8",) or ("W8A8", "W8A6")
    OWN_SCOPE: dict[str, str]                   # optional: variant -> how its placement differs from Scope
    def unavailable() -> str | None             # why the peer cannot run here (not installed...), or None
    def quantize(unet, calib, scope, variant, workdir) -> PeerModel

Peers are optional dependencies of the benchmarks only (`pip install -e '.[bench]'`); a peer
whose library is missing says so through `unavailable()` and the scripts go on without it.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

PEER_MODULES = ("ort_static", "modelopt_int8", "torchao_pt2e", "quanto_w8a8")


@dataclass
class CalibData:
    """The calibration budget: every (x_t, t, cond) of the FP calibration trajectories.

    traj: calibration.trajectories.TrajectorySet (x_t: (steps, N, C, H, W), timesteps (steps,)).
    """

    traj: Any
    batch_size: int = 64

    @property
    def num_forward_passes(self) -> int:
        return self.traj.num_steps * self.traj.num_samples

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(x_t (B, C, H, W) float32, t (B,) int64, cond) for every step and every sample chunk."""
        n = self.traj.num_samples
        for i in range(self.traj.num_steps):
            t = int(self.traj.timesteps[i])
            for lo in range(0, n, self.batch_size):
                sl = slice(lo, min(n, lo + self.batch_size))
                x = self.traj.x_t[i, sl].float()
                yield x, torch.full((x.shape[0],), t, dtype=torch.int64), self.traj.cond_for(sl)


@dataclass(frozen=True)
class Scope:
    """What is quantized: inputs (per tensor) and weights (per output channel) of Conv2d / Linear,
    except modules whose qualified name matches a glob of `fp_layers` (calibration.qconfig's
    DEFAULT_FP_LAYERS, without "conv_in" when `conv_in_fp` is False)."""

    w_bits: int = 8
    a_bits: int = 8
    fp_layers: tuple[str, ...] = ()
    conv_in_fp: bool = True

    def is_fp(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.fp_layers)

    def quantized_modules(self, unet: nn.Module) -> list[str]:
        """Qualified names of the Conv2d / Linear modules in scope."""
        return [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not self.is_fp(n)]


@dataclass
class PeerModel:
    """A peer's quantized UNet, ready for calibration.metrics.

    model: nn.Module called as model(sample, timestep, **cond) -> tensor or object with .sample
    (torch fake-quant or an onnxruntime session behind SessionUNet).
    onnx_path: the peer's deployable QDQ graph, where it makes one (for bench_speed).
    calibration_s: wall time of the peer's calibration (budget passes included).
    notes: what the peer needed or tripped on (traps, workarounds), for the report.
    """

    model: nn.Module
    calibration_s: float
    onnx_path: Optional[Path] = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class SessionUNet(nn.Module):
    """An onnxruntime session (inputs sample / timestep [/ encoder_hidden_states / class_labels])
    as a parameter-free module returning the predicted noise, for calibration.metrics."""

    def __init__(self, session):
        super().__init__()
        from engines.ort_backend import OrtNoisePredictor

        self.predictor = OrtNoisePredictor(session)

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        if not isinstance(timestep, torch.Tensor) or timestep.ndim == 0:
            timestep = torch.full((sample.shape[0],), int(timestep), dtype=torch.int64)
        return self.predictor(sample, timestep, **cond)


def check_request(peer, variant: str, scope: Scope) -> None:
    """Refuse, with the reason, a variant the peer does not have, a peer that cannot run here, or
    bit widths it does not support (peer: the peer module)."""
    if variant not in peer.VARIANTS:
        raise ValueError(f"{peer.NAME}: unknown variant {variant!r}; known: {', '.join(peer.VARIANTS)}")
    why = peer.unavailable()
    if why:
        raise RuntimeError(why)
    bits = f"W{scope.w_bits}A{scope.a_bits}"
    if bits not in peer.BITS:
        raise ValueError(f"{peer.NAME} supports {', '.join(peer.BITS)} only, got {bits}")


def load_peer(module: str):
    """The peer module tools.bench_peers.<module> (always importable; check .unavailable())."""
    return importlib.import_module(f"{__name__}.{module}")


def all_peers() -> list:
    return [load_peer(m) for m in PEER_MODULES]


def missing_module(name: str) -> Optional[str]:
    """None if `name` imports, else the one-line reason."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or a library that fails on import here
        return f"{name} is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); " \
               f"install the bench extra: pip install -c constraints.txt -e '.[bench]'"
    return None


Log = Callable[[str], None]
