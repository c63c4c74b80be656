"""Peer: optimum-quanto W8A8, the naive-EMA calibration baseline.

quanto's flow: quantize(model, weights=qint8, activations=qint8, exclude=...) swaps Conv2d /
Linear (and LayerNorm) for QModules, `with Calibration():` runs the calibration batches while a
global forward hook sets each activation scale to absmax/127 per batch and folds it into an
exponential moving average (momentum 0.9, the first batch taken as is; input scales always use
0.9, whatever Calibration(momentum=...) says), then freeze() stores int8 per-output-channel
weights (absmax, symmetric).

What quanto quantizes is not our scope, and variant "w8a8" keeps quanto's own choice:
* QLinear quantizes its input (pre-hook, quantize_input=True) and its output;
* QConv2d quantizes only its output, never its input, so a conv fed by SiLU / GroupNorm / add
  (every UNet conv) sees an FP input;
* Calibration(streamline=True) then drops the output quantization of modules whose output only
  reaches "incompatible" ops (add, silu, ...).
Variant "w8a8-inputs" uses quanto's own hooks to match our scope exactly: the input of every
in-scope Conv2d / Linear quantized (QModuleMixin.quantize_input), no output quantized.

Calibration batches come in sampler order (t from high to low), so the EMA scale is dominated
by the last ~10 batches, i.e. the lowest timesteps: that is the baseline's nature, not a bug here.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import CalibData, Log, PeerModel, Scope, check_request, missing_module

NAME = "quanto"
BITS = ("W8A8",)
VARIANTS = {
    "w8a8": "optimum-quanto quantize(qint8 weights, qint8 activations) + Calibration() EMA + freeze, quanto's "
            "own activation placement (Linear inputs, module outputs; Conv2d inputs stay FP)",
    "w8a8-inputs": "the same, with quanto's input hooks on every in-scope Conv2d/Linear and no output "
                   "quantization: our scope (per-tensor inputs, per-channel weights)",
}
# variants whose placement is not the shared scope: reported, not ranked against ours
OWN_SCOPE = {"w8a8": "narrower: quanto's own placement (no Conv2d input quantized)"}


def unavailable() -> Optional[str]:
    """None if optimum.quanto imports and quantizes a Linear with this torch, else why."""
    why = missing_module("optimum.quanto")
    if why:
        return why
    try:
        from optimum.quanto import Calibration, freeze, qint8
        from optimum.quanto import quantize as q_quantize

        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).eval()
        q_quantize(net, weights=qint8, activations=qint8)
        with torch.no_grad(), Calibration():
            net(torch.randn(2, 1, 4, 4))
        freeze(net)
        with torch.no_grad():
            net(torch.randn(2, 1, 4, 4))
    except Exception as e:  # quanto imports but does not work with this torch
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return f"optimum-quanto does not work with torch {torch.__version__} ({type(e).__name__}: {first})"
    return None


class QuantoUNet(nn.Module):
    """The quanto-quantized UNet as model(sample, timestep, **cond) -> noise tensor (FP32)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep, **cond) -> torch.Tensor:
        out = self.unet(sample, timestep, **cond)
        out = out.sample if hasattr(out, "sample") else out
        if type(out) is not torch.Tensor and hasattr(out, "dequantize"):  # a quanto QTensor
            out = out.dequantize()
        return out


def _hook_live(module: nn.Module, kind: str) -> bool:
    """Whether the QModule's input / output quantization hook is still registered."""
    h = getattr(module, "_quantize_hooks", {}).get(kind)
    if h is None:
        return False
    hooks = module._forward_pre_hooks if kind == "input" else module._forward_hooks
    return h.id in hooks


def placement(model: nn.Module) -> dict:
    """Where quanto quantizes, per QModule: weights, input, output."""
    from optimum.quanto.nn import QModuleMixin

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            out[name] = {"type": type(m).__name__, "weights": m.weight_qtype is not None,
                         "input": m.activation_qtype is not None and _hook_live(m, "input"),
                         "output": m.activation_qtype is not None and _hook_live(m, "output")}
    return out


def quantize(unet: nn.Module, calib: CalibData, scope: Scope, variant: str = "w8a8",
             workdir: Optional[Path] = None, log: Log = print) -> PeerModel:
    """quanto quantize -> Calibration() over every calibration batch -> freeze, FP layers excluded."""
    check_request(sys.modules[__name__], variant, scope)
    from optimum.quanto import Calibration, freeze, qint8
    from optimum.quanto import quantize as q_quantize
    from optimum.quanto.nn import QConv2d, QModuleMixin

    notes: list[str] = []
    model = copy.deepcopy(unet).float().eval()
    in_scope = scope.quantized_modules(model)
    # quanto's exclude is fnmatch on qualified names, the same globs as Scope.fp_layers
    q_quantize(model, weights=qint8, activations=qint8, exclude=list(scope.fp_layers) or None)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QModuleMixin)}
    if variant == "w8a8-inputs":
        for name, m in qmods.items():
            if isinstance(m, QConv2d) and not _hook_live(m, "input"):
                m._quantize_hooks["input"] = m.register_forward_pre_hook(m.quantize_input)
            m.disable_output_quantization()

    tic = time.perf_counter()
    passes = n_batches = 0
    with torch.no_grad(), Calibration(streamline=(variant == "w8a8")):
        for x, t, cond in calib.batches():
            model(x, t, **cond)
            passes += x.shape[0]
            n_batches += 1
    freeze(model)
    calibration_s = time.perf_counter() - tic
    log(f"   {NAME}/{variant}: calibrated on {passes} passes in {calibration_s:.1f} s")

    place = placement(model)
    weights_q = sorted(n for n, p in place.items() if p["weights"])
    inputs_q = sorted(n for n, p in place.items() if p["input"])
    outputs_q = sorted(n for n, p in place.items() if p["output"])
    if weights_q != sorted(in_scope):
        notes.append(f"quanto quantized the weights of {len(weights_q)} modules vs {len(in_scope)} Conv2d/Linear "
                     f"in scope (outside: {sorted(set(weights_q) - set(in_scope))[:4]}, "
                     f"missing: {sorted(set(in_scope) - set(weights_q))[:4]})")
    other = sorted(n for n, p in place.items() if not p["weights"])
    if other:
        notes.append(f"quanto also swapped {len(other)} weightless modules (activations only): {other[:4]}")
    if variant == "w8a8":
        n_conv = sum(1 for n in in_scope if isinstance(qmods.get(n), QConv2d))
        n_conv_in = sum(1 for n in inputs_q if isinstance(qmods.get(n), QConv2d))
        notes.append(f"scope difference: quanto quantizes the inputs of {len(inputs_q)} of {len(in_scope)} in-scope "
                     f"modules (QLinear only; {n_conv_in} of {n_conv} Conv2d inputs, QConv2d has no input hook) "
                     f"and the outputs of {len(outputs_q)} (the rest dropped by Calibration's streamline)")
    else:
        notes.append(f"quanto hooks set to our scope: inputs of {len(inputs_q)} of {len(in_scope)} in-scope modules "
                     f"quantized, {len(outputs_q)} outputs")
    notes.append(f"activation scales are an EMA (momentum 0.9) of per-batch absmax/127 over {n_batches} batches in "
                 f"sampler order (t high -> low): the last {min(10, n_batches)} (lowest t) carry "
                 f"{100 * (1 - 0.9 ** min(10, n_batches)):.0f}% of the weight")
    scales = {n: float(m.input_scale) for n, m in qmods.items() if _hook_live(m, "input")}
    extra = {
        "variant": variant, "in_scope_modules": len(in_scope), "weight_quantized_modules": len(weights_q),
        "input_quantized_modules": inputs_q, "output_quantized_modules": outputs_q,
        "activation_qtype": "qint8 symmetric per-tensor (absmax/127, EMA momentum 0.9)",
        "weight_qtype": "qint8 symmetric per-output-channel (absmax)",
        "input_scales": scales, "calibration_passes": passes,
        "optimum_quanto": _version("optimum-quanto"), "torch": torch.__version__,
    }
    return PeerModel(model=QuantoUNet(model), calibration_s=calibration_s, notes=notes, extra=extra)


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None
