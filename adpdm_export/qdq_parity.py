"""Parity of the exported QDQ group graphs against the quantization-aware PyTorch wrapper.

`check_group_graph` runs one group graph with onnxruntime (optimizations off) at up to three
timesteps of its group and compares it with the wrapper (`calibration.quant_unet`) simulating
the same target with that group active, and both with the FP model. Because INT8 rounding is
discontinuous, free-running parity is not bounded: `probe_parity` adds a teacher-forced
comparison (every quantizer fed onnxruntime's input) and locates the first quantizer whose
outputs differ (`_first_divergence`), which is accepted only as a one-step rounding tie on at
most TIE_MAX_FRACTION of its tensor. The verdict of each graph is a `GraphCheck`; the export
(`qdq_export.export_qdq`) runs the check on every group graph and records it in `qdq_report.json`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch

from adpdm_export import qdq_graph_passes as P
from engines.errors import AdpdmError
from engines.ort_backend import OUTPUT_NAME as OUTPUT

PARITY_TOL = 1e-3
# A free-running divergence is accepted as a rounding tie only while the elements that differ at the
# first diverging quantizer are at most this fraction of its tensor. How many values sit within
# float noise of a rounding boundary depends on the CPU's kernels (a handful in 10^4 here), so no
# fixed count is a property of the export; a wrong scale or group moves a large fraction.
TIE_MAX_FRACTION = 1e-3
# FP16 / BF16 graphs (the TensorRT target's `--high-precision`) are checked against the wrapper run in
# the same precision (`sim_in_precision`). Two implementations of one FP16 network differ by a few units
# of roundoff per op, so the teacher-forced checks get a tolerance of TOL_EPS_MULTIPLE machine epsilons
# (fp16: 2^-10), and a quantizer input counts as a rounding tie within TIE_EPS_MULTIPLE unit roundoffs
# (2^-11) of a boundary: PyTorch rounds fp16(x * fp16(1/s)), onnxruntime x / s in float32.
TOL_EPS_MULTIPLE = 16
TIE_EPS_MULTIPLE = 4
EPS = {"fp32": 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}
# Largest latent side of the parity inputs. The checks compare the graph with the simulation quantizer by
# quantizer, so they keep every quantizer's (input, output) from both: at SD-1.5's 32x32 latents that was
# 6 GB, most of it self-attention maps (tokens squared). The graphs and the simulation are the same
# function at every size, so a larger model is checked on inputs of at most this side.
PARITY_MAX_SIDE = 16


def parity_sample_shape(sample_shape: Sequence[int], unet: torch.nn.Module) -> tuple[int, ...]:
    """`sample_shape` (C, H, W) with H and W capped at PARITY_MAX_SIDE, kept multiples of the UNet's
    downsampling factor (unchanged where the cap would leave less than one factor)."""
    c, h, w = (int(v) for v in sample_shape)
    levels = len(getattr(getattr(unet, "config", None), "block_out_channels", ()) or ()) - 1
    factor = 2 ** max(levels, 0)
    cap = (PARITY_MAX_SIDE // factor) * factor

    def side(n: int) -> int:
        return cap if n > PARITY_MAX_SIDE and cap >= factor else n

    return (c, side(h), side(w))


SIM_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parity_tolerance(precision: str, fp32_tol: float = PARITY_TOL) -> float:
    """The relative-L2 parity tolerance for graphs computing in `precision` outside the INT8 layers."""
    return float(fp32_tol) if precision == "fp32" else TOL_EPS_MULTIPLE * EPS[precision]


def _tie_rel(precision: str) -> float:
    return 1e-6 if precision == "fp32" else TIE_EPS_MULTIPLE * EPS[precision] / 2


def sim_in_precision(qmodel: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The quantization wrapper computing in `precision` (a copy; the scales lifted to its normal range and
    rounded to it, as in the graph)."""
    import copy

    from adpdm_export.high_precision import tiny
    from calibration.quant_unet import activation_quantizers
    from calibration.quantizers import ActQuantizer, WeightQuantizer

    if precision == "fp32":
        return qmodel
    # The UNet's own tensors are cast while copying (the quantizers' after their scales are set, as
    # before): no transient FP32 copy of the weights.
    dtype = SIM_DTYPE[precision]
    quantizer_tensors = {id(t) for m in qmodel.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))
                         for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    memo: dict[int, Any] = {}
    for t in list(qmodel.parameters()) + list(qmodel.buffers()):
        if id(t) in quantizer_tensors or id(t) in memo or not torch.is_floating_point(t):
            continue
        low = t.detach().to(dtype)
        memo[id(t)] = torch.nn.Parameter(low, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else low
    sim = copy.deepcopy(qmodel, memo)
    for q in activation_quantizers(sim).values():  # lifted as the graph's (high_precision.normal_scale)
        q.set_scale(q.effective_scale().detach().clamp_min(tiny(precision)))
    return sim.to(SIM_DTYPE[precision])


def _sim_call(qmodel: torch.nn.Module, sample, timestep, cond):
    """Run the wrapper with the float inputs in its parameters' dtype; the output as float32."""
    dt = next(qmodel.parameters()).dtype
    cast = lambda v: v.to(dt) if torch.is_floating_point(v) else v  # noqa: E731
    return _eps(qmodel(cast(sample), timestep, **{k: cast(v) for k, v in cond.items()})).float()


@dataclass
class GraphCheck:
    group: int
    target: str
    file: str
    timesteps: list[int]
    parity_rel_l2: float  # onnxruntime (optimizations off) vs the wrapper simulating this target and group
    parity_max_abs: float
    fp_rel_l2: float  # onnxruntime (optimizations off) vs the FP model
    sim_fp_rel_l2: float  # the wrapper's simulation vs the FP model
    optimized_rel_l2: Optional[float] = None  # onnxruntime fully optimized (what runs on CPU) vs simulation
    optimized_fp_rel_l2: Optional[float] = None
    # "exact" | "within-tolerance" | "ties" (beyond the tolerance, but starting at rounding
    # ties: accepted) | "rounding-flips" (FP16: teacher-forced parity holds, the free-running difference
    # is INT8 rounding flips set off by FP16 noise: accepted) | "mismatch"
    forced_rel_l2: Optional[float] = None  # teacher-forced parity (probe_parity): float noise only
    forced: Optional[dict] = None  # per-quantizer teacher-forced checks (worst input rel L2, bad outputs)
    verdict: str = ""
    divergence: Optional[dict] = None  # the first quantizer whose outputs differ, and why (probe_parity)

    @property
    def ok(self) -> bool:
        return self.verdict in ("exact", "within-tolerance", "ties", "rounding-flips")


def _group_timesteps(result, group: int, n: int = 3) -> list[int]:
    """Up to `n` timesteps of `group`: its lowest, highest and middle ones."""
    ts = [t for lo, hi in result.groups[group]["timestep_ranges"] for t in (lo, hi)]
    if not ts:
        table = result.timestep_to_group
        ts = (table == group).nonzero().flatten().tolist()
    lo, hi = min(ts), max(ts)
    members = [t for t in range(lo, hi + 1) if int(result.timestep_to_group[t]) == group]
    picks = [members[0], members[-1], members[len(members) // 2]]
    out = []
    for t in picks:
        if t not in out:
            out.append(int(t))
    return out[:n]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _parity_inputs(result, group: int, sample_shape, conditioning, seed: int = 0):
    from adpdm_export.onnx_export import example_inputs

    ts = _group_timesteps(result, group)
    inputs = example_inputs(tuple(sample_shape), conditioning or {}, batch=len(ts), seed=seed + 1000 * group,
                            num_train_timesteps=result.num_train_timesteps)
    inputs["timestep"] = torch.tensor(ts, dtype=torch.int64)
    return ts, inputs


def _split(inputs: Mapping[str, torch.Tensor]):
    vals = list(inputs.values())
    return vals[0], vals[1], dict(zip(list(inputs)[2:], vals[2:]))


def _parity_session(graph: Path, optimize: bool):
    """A one-run CPU session without onnxruntime's memory arena: an arena keeps the largest set of
    tensors a run held (in the unoptimized graphs, every weight's dequantized copy) until the session
    is freed; without it each is returned as soon as its consumer has run."""
    from engines.ort_backend import make_session

    return make_session(graph, providers=["CPUExecutionProvider"], optimize=optimize, arena=False)


def _run_probe(graph: Path, points, inputs) -> dict[str, np.ndarray]:
    """onnxruntime (optimizations off) on `graph` with every probed tensor made a graph output."""
    model = onnx.load(str(graph), load_external_data=False)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    existing = {o.name for o in model.graph.output}
    for _, _, a, b in points:
        for name in (a, b):
            if name not in existing:
                elem = types.get(name, onnx.TensorProto.FLOAT)
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
                existing.add(name)
    sample, timestep, cond = _split(inputs)
    feeds = {"sample": sample, "timestep": timestep, **cond}
    probe = graph.with_name(f".probe-{os.getpid()}-{graph.name}")  # beside the graph: same external data
    try:
        probe.write_bytes(model.SerializeToString())
        sess = _parity_session(probe, optimize=False)
        names = [o.name for o in sess.get_outputs()]
        feed = {i.name: np.ascontiguousarray(feeds[i.name].numpy()) for i in sess.get_inputs()}
        return dict(zip(names, sess.run(names, feed)))
    finally:
        probe.unlink(missing_ok=True)


def _activation_points(graph: Path, names: Sequence[str]) -> list[tuple[str, float, str, str]]:
    """(quantizer, scale, Q input, DQ output) of every activation Q/DQ pair, in graph order."""
    model = onnx.load(str(graph), load_external_data=False)
    ix = P.GraphIndex(model)
    known = set(names)
    points = []
    for pair in P.qdq_pairs(model, ix):
        if pair.is_weight or pair.q is None or not pair.q.input[1].endswith(P.SCALE_SUFFIX):
            continue
        qn = pair.q.input[1][: -len(P.SCALE_SUFFIX)]
        if qn in known:
            points.append((qn, float(np.float32(ix.const_value(pair.q.input[1]))), pair.q.input[0], pair.dq.output[0]))
    return points


def _first_divergence(points, got, captured, group: int, tie_rel: float = 1e-6) -> dict[str, Any]:
    for qn, scale, x_name, y_name in points:
        if qn not in captured:
            return {"verdict": "mismatch", "quantizer": qn, "reason": "the simulation never ran this quantizer"}
        xt, yt = (t.double().numpy() for t in captured[qn])
        xo, yo = got[x_name].astype(np.float64), got[y_name].astype(np.float64)
        if xt.shape != xo.shape:
            return {"verdict": "mismatch", "quantizer": qn, "reason": f"shape {xo.shape} vs {xt.shape} in the simulation"}
        diff = yo != yt
        if not diff.any():
            continue
        steps = np.abs(yo - yt)[diff] / scale
        in_rel = float(np.abs(xo - xt).max() / max(np.abs(xt).max(), 1e-30))
        lo = np.minimum(xo, xt)[diff] / scale
        hi = np.maximum(xo, xt)[diff] / scale
        # The rounding boundary between the two outputs, which the two inputs must straddle. Slack:
        # PyTorch rounds x * float32(1/s), onnxruntime x / s: a few float32 ulps apart.
        boundary = (yo + yt)[diff] / (2.0 * scale)
        tol = tie_rel * np.maximum(np.abs(boundary), 1.0)
        straddles = (lo <= boundary + tol) & (boundary - tol <= hi)
        info = {
            "quantizer": qn,
            "group": group,
            "elements_differing": int(diff.sum()),
            "elements": int(diff.size),
            "max_steps": float(steps.max()),
            "input_max_rel_diff": in_rel,
        }
        if np.all(np.abs(steps - 1.0) < 1e-3) and in_rel < 1e-4 and bool(straddles.all()):
            if diff.sum() <= TIE_MAX_FRACTION * diff.size:
                return {"verdict": "ties", **info}
            return {"verdict": "mismatch", **info,
                    "reason": f"more than {TIE_MAX_FRACTION:.0e} of the values are one-step ties: not float noise"}
        return {"verdict": "mismatch", **info, "reason": "outputs differ by more than a rounding tie"}
    return {"verdict": "no-quantizer-differs"}


@contextlib.contextmanager
def _capture_quantizers(qmodel: torch.nn.Module, captured: dict) -> Iterator[dict]:
    """Record each activation quantizer's first (input, output) into `captured`."""
    from calibration.quant_unet import activation_quantizers

    hooks = []
    for name, q in activation_quantizers(qmodel).items():
        def hook(mod, args, out, name=name):
            captured.setdefault(name, (args[0].detach().clone(), out.detach().clone()))

        hooks.append(q.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def probe_parity(
    graph: Path,
    qmodel: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    target: str,
    group: int,
    captured: Optional[dict] = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Tie-aware parity of one group graph against the wrapper (simulating `target`).

    8-bit rounding makes a quantized net discontinuous: where a value sits on a rounding
    boundary, float noise of the order of 1e-7 between onnxruntime's and PyTorch's kernels
    (conv accumulation order, attention, normalization) moves it by one grid step, and the
    two runs then legitimately diverge downstream. So besides the free-running comparison:

    * teacher-forced parity: the simulation is run with every quantizer's *input* replaced
      by onnxruntime's input to the same QuantizeLinear (and, once its own result is
      recorded, its output by onnxruntime's DequantizeLinear output, so an exact tie does
      not perturb what follows). Then, per quantizer, (a) its own output must equal
      onnxruntime's (exact ties aside: scales, zero points), (b) the input the simulation
      computed itself from the forced upstream values must equal onnxruntime's up to float
      noise (weights, placement, the float ops between quantizers), and (c) the final output
      too (`forced_rel_l2`);
    * first divergence: comparing each quantizer's output in graph order, the first
      difference must be a rounding tie: one grid step, at a boundary the two
      float-noise-close inputs straddle.
    """
    from calibration.quant_unet import activation_quantizers, quant_mode

    acts = activation_quantizers(qmodel)
    points = _activation_points(graph, list(acts))
    got = _run_probe(graph, points, inputs)
    sample, timestep, cond = _split(inputs)
    if captured is None:
        captured = {}
        with _capture_quantizers(qmodel, captured), torch.no_grad(), quant_mode(qmodel, target=target):
            _sim_call(qmodel, sample, timestep, cond)
    tie_rel = _tie_rel(precision)
    first = _first_divergence(points, got, captured, group, tie_rel)

    forced_in, forced_y = {}, {}
    for qn, _, x_name, y_name in points:
        forced_in.setdefault(qn, torch.from_numpy(np.ascontiguousarray(got[x_name])))
        forced_y.setdefault(qn, torch.from_numpy(np.ascontiguousarray(got[y_name])))
    natural: dict[str, torch.Tensor] = {}  # what the simulation computed, before forcing
    forced_out: dict[str, torch.Tensor] = {}
    hooks = []
    for name, q in acts.items():
        if name in forced_in:
            def pre(mod, args, name=name):
                x = forced_in[name]
                if tuple(x.shape) != tuple(args[0].shape):
                    raise AdpdmError(f"{name}: onnxruntime tensor {tuple(x.shape)} vs {tuple(args[0].shape)} in the simulation")
                natural.setdefault(name, args[0].detach().clone())
                return (x.to(args[0].dtype),)

            def post(mod, args, out, name=name):
                # Record the simulation's quantized values (compared below), then continue with
                # onnxruntime's: an exact tie at this quantizer must not perturb what follows.
                forced_out.setdefault(name, out.detach().clone())
                y = forced_y[name]
                return y.to(out.dtype) if tuple(y.shape) == tuple(out.shape) else out

            hooks += [q.register_forward_pre_hook(pre), q.register_forward_hook(post)]
    try:
        with torch.no_grad(), quant_mode(qmodel, target=target):
            forced = _sim_call(qmodel, sample, timestep, cond)
    finally:
        for h in hooks:
            h.remove()
    out = torch.from_numpy(got[OUTPUT]).float()

    # Per quantizer, with identical inputs: the same quantized values (exact ties aside), and
    # the simulation's own input (computed from the forced upstream values) equal to
    # onnxruntime's up to float noise. The worst of each, by name.
    worst_in = (0.0, "")
    bad_out = (0, "")
    for qn, scale, x_name, y_name in points:
        if qn not in natural:
            bad_out = (max(bad_out[0], 1), qn)
            continue
        r = _rel_l2(natural[qn], forced_in[qn])
        if r > worst_in[0]:
            worst_in = (r, qn)
        # Compared on the integer grid: an FP16 DequantizeLinear output is q * s rounded to FP16, so
        # the integers are recovered by rounding y / s (|q| <= 128 needs 8 of FP16's 11 bits).
        qo = np.round(got[y_name].astype(np.float64) / scale)
        qt = np.round(forced_out[qn].double().numpy() / scale)
        x = forced_in[qn].double().numpy()
        diff = qo != qt
        if diff.any():
            boundary = (qo + qt)[diff] / 2.0
            near = np.abs(x[diff] / scale - boundary) <= tie_rel * np.maximum(np.abs(boundary), 1.0)
            one_step = np.abs(qo - qt)[diff] == 1
            n_bad = int((~(near & one_step)).sum())
            if n_bad > bad_out[0]:
                bad_out = (n_bad, qn)
    return {
        "forced_rel_l2": _rel_l2(out, forced),
        "forced_worst_input_rel_l2": worst_in[0],
        "forced_worst_input_at": worst_in[1],
        "forced_bad_outputs": bad_out[0],
        "forced_bad_outputs_at": bad_out[1],
        "first_divergence": first,
        "quantizers_probed": len(points),
    }


def check_group_graph(
    graph: Path,
    qmodel: torch.nn.Module,
    fp_unet: torch.nn.Module,
    result,
    group: int,
    target: str,
    sample_shape: Sequence[int],
    conditioning: Mapping[str, Any],
    seed: int = 0,
    optimized: bool = False,
    parity_tol: float = PARITY_TOL,
    precision: str = "fp32",
) -> GraphCheck:
    """Parity of one group graph against the wrapper simulating `target` with `group` active.

    Verdicts: "exact" / "within-tolerance" (free-running relative L2 <= parity_tol and
    teacher-forced too); "ties" (free-running beyond the tolerance, but the teacher-forced
    parity holds and the first difference is a rounding tie: accepted, reported);
    "mismatch" otherwise. See `probe_parity`. precision "fp16": `qmodel` computes in FP16
    (`sim_in_precision`), the tolerance is `parity_tolerance("fp16")`, and a free-running difference
    beyond it is accepted as "rounding-flips" when every teacher-forced check holds (FP16 noise moves
    many values across INT8 rounding boundaries, so the first divergence is rarely one exact tie).
    """
    from calibration.quant_unet import quant_mode
    from engines.ort_backend import OrtNoisePredictor

    ts, inputs = _parity_inputs(result, group, sample_shape, conditioning, seed)
    sample, timestep, cond = _split(inputs)
    got = OrtNoisePredictor(_parity_session(graph, optimize=False))(sample, timestep, **cond)
    captured: dict = {}
    with torch.no_grad():
        with _capture_quantizers(qmodel, captured), quant_mode(qmodel, target=target):
            sim = _sim_call(qmodel, sample, timestep, cond)
        fp = _eps(fp_unet(sample, timestep, **cond))
    check = GraphCheck(
        group=group,
        target=target,
        file=graph.name,
        timesteps=ts,
        parity_rel_l2=_rel_l2(got, sim),
        parity_max_abs=float((got - sim).abs().max()),
        fp_rel_l2=_rel_l2(got, fp),
        sim_fp_rel_l2=_rel_l2(sim, fp),
    )
    probe = probe_parity(graph, qmodel, inputs, target, group, captured, precision=precision)
    check.forced_rel_l2 = probe["forced_rel_l2"]
    check.forced = {k: v for k, v in probe.items() if k.startswith("forced_") and k != "forced_rel_l2"}
    check.divergence = probe["first_divergence"]
    first = check.divergence["verdict"]
    forced_bad = (
        check.forced_rel_l2 > parity_tol
        or probe["forced_worst_input_rel_l2"] > parity_tol
        or probe["forced_bad_outputs"] > 0
    )
    if forced_bad or (first == "mismatch" and precision == "fp32"):
        check.verdict = "mismatch"
        if forced_bad and first != "mismatch":
            at = probe["forced_bad_outputs_at"] if probe["forced_bad_outputs"] else probe["forced_worst_input_at"]
            check.divergence = {
                "verdict": "mismatch",
                "quantizer": at or "(after the last quantizer)",
                "reason": (
                    f"with onnxruntime's inputs forced into the simulation: {probe['forced_bad_outputs']} quantized "
                    f"values differ beyond ties, worst quantizer-input rel L2 {probe['forced_worst_input_rel_l2']:.2e}, "
                    f"output rel L2 {check.forced_rel_l2:.2e}"
                ),
                "free_running": first,
            }
    elif check.parity_rel_l2 == 0.0:
        check.verdict = "exact"
    elif check.parity_rel_l2 <= parity_tol:
        check.verdict = "within-tolerance"
    elif precision != "fp32":
        check.verdict = "rounding-flips"
        check.divergence = {k: v for k, v in check.divergence.items() if k != "reason"} | {"verdict": "rounding-flips"}
    else:
        check.verdict = "ties" if first == "ties" else "mismatch"
    if optimized:
        opt = OrtNoisePredictor(_parity_session(graph, optimize=True))(sample, timestep, **cond)
        check.optimized_rel_l2 = _rel_l2(opt, sim)
        check.optimized_fp_rel_l2 = _rel_l2(opt, fp)
    return check


def _eps(out):
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)


__all__ = [
    "PARITY_MAX_SIDE",
    "parity_sample_shape",
    "GraphCheck",
    "PARITY_TOL",
    "TIE_MAX_FRACTION",
    "check_group_graph",
    "parity_tolerance",
    "probe_parity",
    "sim_in_precision",
]
