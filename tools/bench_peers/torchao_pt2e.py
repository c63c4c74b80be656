"""Peer: torchao PT2E static INT8 with X86InductorQuantizer, restricted to our scope.

The flow a PyTorch user would follow for CPU INT8: torch.export the UNet, prepare_pt2e with
X86InductorQuantizer, run the calibration batches, convert_pt2e. The converted graph holds
reference quantize/dequantize ops, so running it eagerly gives the deployed numerics without an
inductor compile (quality only; bench_speed does not use it).

Scope: the quantizer's default static config (activations uint8 asymmetric per tensor with a
HistogramObserver, weights int8 symmetric per output channel) is set by module name on every
in-scope Conv2d / Linear only. Its global config is not usable on a diffusers UNet: it also
annotates the `timesteps * ones` multiply of the int64 timestep, whose HistogramObserver fails
("histogram_cpu" not implemented for 'Long'). A name filter keeps the fused conv+add / matmul /
mul patterns out (their nodes are not all inside one Conv2d / Linear), so only the inputs and
weights of the named layers are quantized; the count is checked against the scope.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import CalibData, Log, PeerModel, Scope, check_request, missing_module

NAME = "torchao-pt2e"
BITS = ("W8A8",)
VARIANTS = {
    "x86-inductor": "torch.export + prepare_pt2e(X86InductorQuantizer default static config per in-scope "
                    "Conv2d/Linear: uint8 per-tensor HistogramObserver inputs, int8 per-channel weights) "
                    "+ convert_pt2e, reference Q/DQ run eagerly",
    "x86-inductor-sym": "the same with int8 SYMMETRIC per-tensor HistogramObserver inputs (zero point 0, as ours "
                        "and as TensorRT requires): separates the observer from the asymmetric range",
}

_QUANTIZER = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"
_PT2E = "torchao.quantization.pt2e.quantize_pt2e"
# diffusers' Upsample2D calls .contiguous() when batch >= 64, so export guards the batch to <= 63.
MAX_BATCH = 63
MIN_BATCH = 2  # torch.export specializes dynamic sizes 0 / 1


class _Forward(nn.Module):
    """(sample, timestep, *cond) -> noise tensor: a plain signature for torch.export."""

    def __init__(self, unet: nn.Module, cond_keys: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.cond_keys = cond_keys

    def forward(self, sample, timestep, *cond):
        return self.unet(sample, timestep, **dict(zip(self.cond_keys, cond))).sample


class PT2EUNet(nn.Module):
    """An exported (prepared or converted) graph as model(sample, timestep, **cond) -> noise.

    Splits batches into chunks the export accepts (<= max_batch) and pads short chunks to
    min_batch by repeating the last row (the padding rows are dropped)."""

    def __init__(self, graph: nn.Module, cond_keys: tuple[str, ...], min_batch: int, max_batch: int):
        super().__init__()
        self.graph = graph
        self.cond_keys = cond_keys
        self.min_batch, self.max_batch = min_batch, max_batch

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep, **cond) -> torch.Tensor:
        n = sample.shape[0]
        if not isinstance(timestep, torch.Tensor) or timestep.ndim == 0:
            timestep = torch.full((n,), int(timestep), dtype=torch.int64)
        ins = [sample, timestep.to(torch.int64)] + [cond[k] for k in self.cond_keys]
        outs = []
        for lo in range(0, n, self.max_batch):
            part = [a[lo: lo + self.max_batch] for a in ins]
            m = part[0].shape[0]
            if m < self.min_batch:
                part = [torch.cat([a, a[-1:].expand(self.min_batch - m, *a.shape[1:])]) for a in part]
            outs.append(self.graph(*part)[:m])
        return torch.cat(outs)


@functools.lru_cache(maxsize=1)
def unavailable() -> Optional[str]:
    """None if torchao's PT2E flow works here (a tiny Conv+Linear graph goes through it), else why."""
    for mod in (_PT2E, _QUANTIZER):
        why = missing_module(mod)
        if why:
            return why
    try:
        from torch.export import export

        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)

        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).eval()
        x = torch.randn(2, 1, 4, 4)
        q = X86InductorQuantizer()
        q.set_module_type_qconfig(nn.Conv2d, get_default_x86_inductor_quantization_config())
        p = prepare_pt2e(export(net, (x,)).module(), q)
        p(x)
        convert_pt2e(p)(x)
    except Exception as e:  # torchao imports but its PT2E flow fails with this torch
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return f"torchao PT2E does not work with torch {torch.__version__} ({type(e).__name__}: {first})"
    return None


def _module_of(node) -> Optional[str]:
    """Qualified name (inside the UNet) of the innermost module a graph node comes from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if path.startswith("L['self']."):
        path = path[len("L['self']."):]
    return path[len("unet."):] if path.startswith("unet.") else path


def _is_op(node, names: tuple[str, ...]) -> bool:
    return getattr(node, "op", None) == "call_function" and any(n in str(node.target) for n in names)


def inspect_converted(gm: nn.Module) -> dict:
    """What convert_pt2e quantized: Conv2d / Linear nodes with a Q/DQ activation input and a
    per-channel dequantized weight, and any activation Q/DQ that feeds something else."""
    quantized, weight_only, act_only, other = [], [], [], []
    conv_linear = ("aten.conv2d", "aten.linear")
    for node in gm.graph.nodes:
        if not _is_op(node, conv_linear):
            continue
        a_q = _is_op(node.args[0], ("dequantize_per_tensor",))
        w_q = _is_op(node.args[1], ("dequantize_per_channel",))
        name = _module_of(node)
        (quantized if a_q and w_q else weight_only if w_q else act_only if a_q else other).append(name)
    # activation quantize ops whose dequantized value reaches anything but a conv / linear input
    elsewhere = []
    for node in gm.graph.nodes:
        if not _is_op(node, ("quantize_per_tensor",)) or _is_op(node, ("dequantize",)):
            continue
        for dq in node.users:
            for user in dq.users:
                if not (_is_op(user, conv_linear) and user.args[0] is dq):
                    elsewhere.append(f"{user.target} ({_module_of(user)})")
    return {"quantized": quantized, "weight_only": weight_only, "act_only": act_only, "fp": other,
            "qdq_elsewhere": elsewhere}


def quantize(unet: nn.Module, calib: CalibData, scope: Scope, variant: str = "x86-inductor",
             workdir: Optional[Path] = None, log: Log = print) -> PeerModel:
    """Export, prepare (scope by module name), calibrate on every calibration batch, convert."""
    check_request(sys.modules[__name__], variant, scope)
    import copy

    from torch.export import Dim, export

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    notes: list[str] = []
    model = copy.deepcopy(unet).float().eval()
    x0, t0, c0 = next(iter(calib.batches()))
    cond_keys = tuple(sorted(c0))
    wrapper = _Forward(model, cond_keys).eval()
    n0 = max(MIN_BATCH, min(MAX_BATCH, x0.shape[0]))
    ex = tuple(a[:1].expand(n0, *a.shape[1:]).contiguous() for a in [x0, t0] + [c0[k] for k in cond_keys])

    tic = time.perf_counter()
    batch = Dim("batch", min=MIN_BATCH, max=MAX_BATCH)
    try:
        # forward(sample, timestep, *cond): the conditions' specs are one nested tuple, as the signature's
        # *cond (a flat tuple fails on conditional UNets, and fell back to a fixed batch); none without conditions
        dims = ({0: batch}, {0: batch}) + ((tuple({0: batch} for _ in cond_keys),) if cond_keys else ())
        gm = export(wrapper, ex, dynamic_shapes=dims).module()
        lo, hi = MIN_BATCH, MAX_BATCH
    except Exception as e:  # a UNet whose batch cannot be dynamic: fixed batch, pad / split at run time
        notes.append(f"dynamic-batch export failed ({type(e).__name__}: {(str(e) or '?').splitlines()[0][:120]}); "
                     f"exported with a fixed batch of {n0}, padded / split at run time")
        gm = export(wrapper, ex).module()
        lo = hi = n0
    t_export = time.perf_counter() - tic

    in_scope = scope.quantized_modules(model)
    cfg = get_default_x86_inductor_quantization_config()
    if variant == "x86-inductor-sym":
        cfg = _symmetric_activations(cfg)
    quantizer = X86InductorQuantizer()
    for name in in_scope:
        quantizer.set_module_name_qconfig(f"unet.{name}", cfg)
    prepared = prepare_pt2e(gm, quantizer)
    runner = PT2EUNet(prepared, cond_keys, lo, hi)
    passes = 0
    for x, t, cond in calib.batches():
        runner(x, t, **cond)
        passes += x.shape[0]
    converted = convert_pt2e(prepared)
    calibration_s = time.perf_counter() - tic
    log(f"   {NAME}: export {t_export:.1f} s, prepare+calibrate({passes} passes)+convert "
        f"{calibration_s - t_export:.1f} s")

    info = inspect_converted(converted)
    got, want = sorted(info["quantized"]), sorted(in_scope)
    if got != want:
        missing = sorted(set(want) - set(got))
        extra_q = sorted(set(got) - set(want))
        notes.append(f"quantized {len(got)} Conv2d/Linear vs {len(want)} in scope: missing {missing[:6]}, "
                     f"outside scope {extra_q[:6]}")
    if info["qdq_elsewhere"]:
        notes.append(f"X86InductorQuantizer also inserted {len(info['qdq_elsewhere'])} activation Q/DQ "
                     f"that feed other ops: {info['qdq_elsewhere'][:4]}")
    if variant == "x86-inductor":
        notes.append("scope difference: activations are uint8 asymmetric per tensor (HistogramObserver, the quantizer's "
                     "default static config) where ours are symmetric; x86-inductor-sym is the same with symmetric int8")
    notes.append("global config not used: it also annotates the int64 timestep multiply and its HistogramObserver "
                 "fails (\"histogram_cpu\" not implemented for 'Long'); configs are set per in-scope module name")
    if (lo, hi) == (MIN_BATCH, MAX_BATCH):
        notes.append(f"export guards the batch to <= {MAX_BATCH} (diffusers Upsample2D branches on batch >= 64), "
                     f"so calibration and evaluation run in chunks of <= {MAX_BATCH}")
    extra = {
        "quantized_modules": len(got), "in_scope_modules": len(want), "weight_only_modules": info["weight_only"],
        "act_only_modules": info["act_only"], "qdq_elsewhere": info["qdq_elsewhere"],
        "export_s": t_export, "calibration_passes": passes, "batch_range": [lo, hi],
        "activation_observer": "HistogramObserver " + ("int8 symmetric" if variant == "x86-inductor-sym"
                                                       else "uint8 asymmetric") + " per-tensor",
        "weight_observer": "PerChannelMinMaxObserver int8 symmetric ch_axis=0",
        "torchao": _version("torchao"), "torch": torch.__version__,
    }
    return PeerModel(model=PT2EUNet(converted, cond_keys, lo, hi), calibration_s=calibration_s,
                     notes=notes, extra=extra)


def _symmetric_activations(cfg):
    """`cfg` with int8 symmetric per-tensor activation specs (same HistogramObserver)."""
    import dataclasses

    def sym(spec):
        if spec is None:
            return None
        return dataclasses.replace(spec, dtype=torch.int8, quant_min=-128, quant_max=127,
                                   qscheme=torch.per_tensor_symmetric)

    return dataclasses.replace(cfg, input_activation=sym(cfg.input_activation),
                               output_activation=sym(cfg.output_activation))


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None
