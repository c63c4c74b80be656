"""Symmetric uniform fake quantization with straight-through rounding and learnable scales.

Numerics (the contract the QDQ export relies on):

* integer grid [-2**(b-1), 2**(b-1) - 1] (-128..127 for 8 bits), zero point 0;
* q(x; s) = clamp(round(x * (1/s)), qmin, qmax) * s with s float32 and 1/s computed in
  float32, `round` half to even: bit for bit what `torch.fake_quantize_per_tensor_affine`
  / `torch.fake_quantize_per_channel_affine` compute (they multiply by the float32
  reciprocal, they do not divide), so export mode and simulation agree exactly;
* scale = amax / (2**(b-1) - 1), never below `MIN_SCALE`.

Gradients: rounding is straight-through; the gradient reaching a scale is LSQ's
(round(x/s) - x/s inside the range, qmin or qmax where clipped), and reaches a
learnable log-scale through s = exp(log_s).

`ActQuantizer` holds one scale per timestep group. Which group it applies comes from a
`QuantState` shared by every quantizer of a wrapped model (see `quant_unet`): either a
hard group per batch item (`group_ids`), or relaxed mixture weights over the groups
(`mixture`, giving sum_g pi[b, g] * q(x; s[g]), for the ADP-DM group search).
`WeightQuantizer` holds one scale per output channel (axis 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from engines.errors import AdpdmError

MIN_SCALE = 1e-8


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer grid of `bits` bits: (-2**(b-1), 2**(b-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_amax(amax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """amax / qmax as float32, floored at MIN_SCALE (scales are strictly positive)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / float(qrange(bits)[1])).clamp_min(MIN_SCALE).to(torch.float32)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D401 - torch autograd signature
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round half to even forward, identity backward."""
    return _RoundSTE.apply(x)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization of `x` with `scale` broadcast against it.

    Differentiable in `x` (straight-through, zero outside the clipping range) and in
    `scale` (LSQ). Equal bit for bit to torch.fake_quantize_per_*_affine.
    """
    qmin, qmax = qrange(bits)
    scale = scale.to(x.dtype)
    inv = 1.0 / scale
    return torch.clamp(round_ste(x * inv), qmin, qmax) * scale


def fake_quant_per_channel(w: torch.Tensor, scales: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    shape = [1] * w.ndim
    shape[axis] = -1
    return fake_quant(w, scales.view(shape), bits)


def export_fake_quant_per_tensor(x: torch.Tensor, scale: float, bits: int, zero_point: str = "int8") -> torch.Tensor:
    """The export form: exports to ONNX QuantizeLinear/DequantizeLinear.

    `zero_point` "int8" gives zero point 0 on [qmin, qmax]; "uint8" gives zero point
    2**(b-1) on [0, 2**b - 1], the same grid (the onnxruntime target's choice).
    """
    qmin, qmax = qrange(bits)
    if zero_point == "uint8":
        return torch.fake_quantize_per_tensor_affine(x, float(scale), -qmin, 0, qmax - qmin)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, qmin, qmax)


def export_fake_quant_per_channel(w: torch.Tensor, scales: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    zp = torch.zeros(scales.shape, dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scales.to(w.device, torch.float32), zp, axis, qmin, qmax)


def per_item_rows(values: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of per-item `values` (B, ...) for a tensor whose leading dim is n = B or k*B.

    A leading dim k*B is taken item-major (items 0..B-1 each repeated k times in a row),
    which is how diffusers folds attention heads into the batch (B, heads) -> B*heads.
    One row (B == 1) is returned as is and broadcasts to everything.
    """
    b = values.shape[0]
    if b == 1 or n == b:
        return values
    if n % b == 0:
        return values.repeat_interleave(n // b, dim=0)
    raise AdpdmError(
        f"cannot match {b} per-item timestep groups to a tensor of leading dimension {n}; "
        "pass one timestep per batch item or a single timestep"
    )


def expand_per_item(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-item scalars `values` (B,) shaped to broadcast against `x` (leading dim B or k*B)."""
    v = per_item_rows(values.reshape(-1), x.shape[0] if x.ndim else 1)
    return v.reshape(-1, *([1] * max(x.ndim - 1, 0)))


class QuantState:
    """What every quantizer of one model consults at run time (a plain object, not a module).

    act_enabled / weight_enabled: simulate activation / weight quantization (False: FP).
    target: "trt" (output quantizers pass through) or "ort" (output quantizers apply).
    group_ids: per-item group ids (B,) or a 1-element tensor for the whole batch.
    uniform_group: the single group of the whole batch when there is one (fast path).
    mixture: relaxed weights over groups, (G,) or per item (B, G); overrides groups.
    export_group: when set, export mode: every quantizer uses that group's scale through
        torch.fake_quantize_* (no timestep-dependent control flow).
    export_zero_point: "int8" or "uint8" activation zero points in export mode.
    observer: callable(quantizer, x) called with each quantizer's input (calibration).
    table: the wrapped model's timestep->group table (LongTensor (T,)).
    mixture_fn: when set, the wrapper computes `mixture` from the timesteps instead of groups.
    """

    def __init__(self, num_groups: int = 1):
        self.num_groups = int(num_groups)
        self.act_enabled = True
        self.weight_enabled = True
        self.target = "trt"
        self.group_ids: Optional[torch.Tensor] = None
        self.uniform_group: Optional[int] = None
        self.mixture: Optional[torch.Tensor] = None
        self.export_group: Optional[int] = None
        self.export_zero_point = "int8"
        self.observer: Optional[Callable[["ActQuantizer", torch.Tensor], None]] = None
        self.table: Optional[torch.Tensor] = None  # timestep value -> group id (wrapper)
        self.mixture_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def set_groups(self, group_ids: Optional[torch.Tensor]) -> None:
        """Per-item hard groups for the next forward (None: clear)."""
        self.mixture = None
        if group_ids is None:
            self.group_ids, self.uniform_group = None, None
            return
        g = torch.as_tensor(group_ids, dtype=torch.int64).reshape(-1)
        if g.numel() == 0:
            raise AdpdmError("empty group ids")
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= self.num_groups:
            raise AdpdmError(f"group id out of range 0..{self.num_groups - 1}: {lo if lo < 0 else hi}")
        self.group_ids = g
        self.uniform_group = lo if lo == hi else None

    def item_groups(self) -> Optional[torch.Tensor]:
        return self.group_ids


class _QuantizerBase(nn.Module):
    """Shared plumbing: bit width, scale buffer, optional learnable log-scale, state."""

    def __init__(self, bits: int, size: int):
        super().__init__()
        self.bits = int(bits)
        self.qname = ""
        self.register_buffer("scale", torch.ones(int(size), dtype=torch.float32))
        self.log_scale: Optional[nn.Parameter] = None
        self._state = QuantState()

    # -- scales ---------------------------------------------------------------------
    def effective_scale(self) -> torch.Tensor:
        """The scales in use: exp(log_scale) while learnable, else the `scale` buffer."""
        if self.log_scale is not None:
            return self.log_scale.exp().clamp_min(MIN_SCALE)
        return self.scale

    def set_scale(self, scale: torch.Tensor | float) -> None:
        s = torch.as_tensor(scale, dtype=torch.float32).to(self.scale.device)
        s = s.expand_as(self.scale) if s.numel() == 1 else s.reshape(self.scale.shape)
        if not torch.isfinite(s).all():
            raise AdpdmError(f"non-finite scale for {self.qname or type(self).__name__}")
        self.scale.copy_(s.clamp_min(MIN_SCALE))
        if self.log_scale is not None:
            with torch.no_grad():
                self.log_scale.copy_(self.scale.log())

    def set_amax(self, amax: torch.Tensor | float) -> None:
        self.set_scale(scale_from_amax(torch.as_tensor(amax, dtype=torch.float32), self.bits))

    def make_learnable(self) -> nn.Parameter:
        """Turn the scales into a learnable log-scale Parameter (LSQ); returns it."""
        if self.log_scale is None:
            self.log_scale = nn.Parameter(self.scale.detach().clone().log())
        return self.log_scale

    def freeze(self) -> None:
        """Write the learned scales into the `scale` buffer and drop the Parameter."""
        if self.log_scale is not None:
            with torch.no_grad():
                self.scale.copy_(self.log_scale.detach().exp().clamp_min(MIN_SCALE))
            self.log_scale = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, size={self.scale.numel()}, learnable={self.log_scale is not None}"


class ActQuantizer(_QuantizerBase):
    """Per-tensor activation quantizer with one scale per timestep group.

    role: "input" (of a Conv/Linear), "output" (of a Conv/Linear; applied only in the
    `ort` target), "bmm" (attention matmul input) or "residual" (residual-add input).
    """

    def __init__(self, bits: int = 8, num_groups: int = 1, role: str = "input"):
        super().__init__(bits, num_groups)
        self._state = QuantState(num_groups)  # private until a wrapped model shares its own
        self.role = role
        self.enabled = True

    @property
    def num_groups(self) -> int:
        return self.scale.numel()

    def resize_groups(self, num_groups: int) -> None:
        """Change the number of groups (scales reset to 1; learnable state dropped)."""
        self.log_scale = None
        self.scale = torch.ones(int(num_groups), dtype=torch.float32, device=self.scale.device)
        if getattr(self, "_owns_state", True):
            self._state.num_groups = int(num_groups)

    def applies(self) -> bool:
        """Whether this quantizer changes its input in the current mode/target."""
        st = self._state
        if not self.enabled:
            return False
        if self.role == "output" and st.target != "ort":
            return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state
        if st.export_group is not None:
            if not self.applies():
                return x
            s = self.__dict__.get("_export_scale")
            if s is None:  # export_mode precomputes it, so tracing sees a constant
                s = float(self.scale[st.export_group])
            return export_fake_quant_per_tensor(x, s, self.bits, st.export_zero_point)
        if st.observer is not None:
            st.observer(self, x)
        if not (st.act_enabled and self.applies()):
            return x
        scales = self.effective_scale()
        if st.mixture is not None:
            return self._relaxed(x, scales, st.mixture)
        if st.uniform_group is not None:
            return fake_quant(x, scales[st.uniform_group], self.bits)
        if st.group_ids is None:
            if scales.numel() == 1:
                return fake_quant(x, scales[0], self.bits)
            raise AdpdmError(
                f"{self.qname or 'quantizer'} has {scales.numel()} groups but no active group: call the wrapped "
                "UNet with a timestep (or set groups on its QuantState)"
            )
        gid = st.group_ids.to(scales.device)
        s = expand_per_item(scales[gid], x)
        return fake_quant(x, s, self.bits)

    def _relaxed(self, x: torch.Tensor, scales: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        g = scales.numel()
        pi = pi.to(x.device, x.dtype)
        if pi.shape[-1] != g:
            raise AdpdmError(f"mixture weights have {pi.shape[-1]} groups, quantizer {self.qname} has {g}")
        sg = scales.view(g, *([1] * x.ndim))
        q = fake_quant(x.unsqueeze(0), sg, self.bits)  # (G, *x.shape)
        if pi.ndim == 1:
            w = pi.view(g, *([1] * x.ndim))
        else:
            rows = per_item_rows(pi.reshape(-1, g), x.shape[0])  # (N or 1, G)
            w = rows.T.reshape(g, rows.shape[0], *([1] * (x.ndim - 1)))
        return (w * q).sum(0)


class WeightQuantizer(_QuantizerBase):
    """Per-output-channel (axis 0) symmetric weight quantizer, shared by all groups."""

    def __init__(self, bits: int = 8, channels: int = 1):
        super().__init__(bits, channels)
        self.enabled = True

    def init_from_weight(self, w: torch.Tensor) -> None:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
        self.set_amax(amax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        st = self._state
        if not self.enabled:
            return w
        if st.export_group is not None:
            return export_fake_quant_per_channel(w, self.scale, self.bits)
        if not st.weight_enabled:
            return w
        return fake_quant_per_channel(w, self.effective_scale(), self.bits)


def lsq_grad_scale(numel: int, bits: int) -> float:
    """LSQ's recommended step-size gradient scale 1/sqrt(numel * qmax) (for optimizers)."""
    return 1.0 / math.sqrt(max(1, numel) * qrange(bits)[1])


__all__: list[Any] = [
    "MIN_SCALE",
    "qrange",
    "scale_from_amax",
    "round_ste",
    "fake_quant",
    "fake_quant_per_channel",
    "export_fake_quant_per_tensor",
    "export_fake_quant_per_channel",
    "expand_per_item",
    "per_item_rows",
    "QuantState",
    "ActQuantizer",
    "WeightQuantizer",
    "lsq_grad_scale",
]
