"""onnxruntime `quantize_static` as a benchmark peer: QDQ, per-channel int8 weights, symmetric int8
activations, op types Conv / MatMul / Gemm, the FP UNet exported to ONNX and calibrated on the
same (x_t, t) pairs our methods use.

Scope. For "minmax" / "percentile" / "entropy" only the INPUTS of the in-scope Conv/MatMul/Gemm
nodes are quantized (`OpTypesToExcludeOutputQuantization`), as ours does; the Conv/Linear modules
kept FP by `Scope` are mapped to their ONNX nodes by the TorchScript exporter's scope names
(`/unet/down_blocks.1/attentions.0/to_q/MatMul` -> module `down_blocks.1.attentions.0.to_q`), and
the attention score/value MatMuls (no module of their own) stay FP as in ours. "minmax-wide" is
onnxruntime's own wider scope: the outputs of those nodes are quantized too, which its CPU
kernels need to fuse DQ->Conv->Q into QLinearConv / QLinearMatMul.

Calibration trap. `quantize_static` runs the calibrator once over the whole reader, which keeps
every intermediate output in RAM until the end (histogram calibrators keep the full tensors:
~15 GB for 3200 samples of a digits UNet), and its `CalibMaxIntermediateOutputs` escape clears
MinMax data without reducing it ("No data is collected"). So we create the calibrator ourselves
(`calibrate.create_calibrator`) and call `collect_data` once per calibration batch: MinMax merges
ranges across calls (`merge_range`), the histogram calibrators merge histograms
(`HistogramCollector.merge_histogram` / `collect_absolute_value`). This is the loop `quantize_static` runs itself with
`CalibStridedMinMax` (checked: identical scales on the reference model), with our thread count,
the histograms restricted to the tensors the quantizer needs, and peak RSS recorded. The ranges
then go to `quantize_static` through its calibration cache (`calibration_cache_path`).

Entropy. With its default 128 bins and 128 quantized bins, a one-pass histogram leaves the KL
search a single candidate, the whole range: Entropy == MinMax exactly (133/133 tensors on the
reference model). Merging batches grows the histograms (to ~400 bins), so chunked Entropy does
search; `extra["entropy_equals_minmax"]` says how many ranges still equal MinMax.

Scope fix. onnxruntime rewires every consumer of a quantized tensor to its DequantizeLinear, so FP
nodes next to a quantized layer (the GroupNorm beside a conv_shortcut) would read quantized values;
for our scope those get the FP tensor back (`restore_fp_consumers`). Without it the minmax row was
rel L2 0.088 vs 0.077 for a torch fake-quant of the same scope; with it 0.076.
"""

from __future__ import annotations

import contextlib
import io
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tools.bench_peers import CalibData, Log, PeerModel, Scope, SessionUNet, missing_module

NAME = "ort-static"
BITS = ("W8A8",)  # onnxruntime's QDQ quantizer has no 6-bit activation type, so no W8A6 row.
OP_TYPES = ("Conv", "MatMul", "Gemm")

VARIANTS = {
    "minmax": "MinMax ranges, inputs of Conv/MatMul/Gemm only (our scope); W8A8 only: ORT has no A6 type",
    "percentile": "Percentile of |x| (our 99.99), 2048 bins, inputs only (our scope)",
    "entropy": "Entropy (KL) with ORT defaults (128 bins, 128 quantized bins), inputs only (our scope)",
    "minmax-wide": "MinMax, outputs of Conv/MatMul/Gemm quantized too (ORT's own scope, fusable to "
                   "QLinearConv); bench_speed times the same scope with uint8 activations (fastest_qdq_graph)",
    "minmax-wide-u8": "the graph bench_speed times (fastest_qdq_graph): minmax-wide with uint8 asymmetric activations",
}


@dataclass(frozen=True)
class _Config:
    method: str  # "MinMax" | "Percentile" | "Entropy" (onnxruntime CalibrationMethod names)
    wide: bool = False  # quantize outputs of Conv/MatMul/Gemm too
    activation_type: str = "QInt8"  # QuantType name
    activation_symmetric: bool = True
    reduce_range: bool = False


_CONFIGS = {
    "minmax": _Config("MinMax"),
    "percentile": _Config("Percentile"),
    "entropy": _Config("Entropy"),
    "minmax-wide": _Config("MinMax", wide=True),
}
# bench_speed's "quantize_static, fastest variant": the wide MinMax scope with uint8 asymmetric
# activations (U8S8, ORT's CPU default). Measured on the reference model, batch 16, 2 threads,
# 80 interleaved runs on a loaded 2-core AMD EPYC (avx512_vnni): its fused graph has 33 QLinearConv
# + 16 QLinearMatMul vs 24 + 4 for symmetric int8 (S8S8), and ran 1.71x FP32 (median of paired
# ratios) vs 1.30x for S8S8 (U8S8 with reduce_range: 1.57x vs 1.68x in a 40-run pass); inputs-only QDQ is 0.70x (slower
# than FP32: DQ + float Conv).
FASTEST = _Config("MinMax", wide=True, activation_type="QUInt8", activation_symmetric=False)
_CONFIGS["minmax-wide-u8"] = FASTEST
# variants whose placement is not the shared scope: reported, not ranked against ours
OWN_SCOPE = {"minmax-wide": "wider: Conv/MatMul outputs quantized too (onnxruntime's own scope)",
             "minmax-wide-u8": "wider, uint8 activations: the graph bench_speed times"}


def unavailable() -> Optional[str]:
    return missing_module("onnxruntime.quantization")


# --------------------------------------------------------------------------------------------
# ONNX node <-> module mapping
# --------------------------------------------------------------------------------------------
def node_module(node_name: str) -> Optional[str]:
    """The qualified module name a TorchScript-exported node belongs to (None without a scope).

    `/unet/down_blocks.0/resnets.0/conv1/Conv` -> `down_blocks.0.resnets.0.conv1`: the exporter
    joins module attribute names with "/" (ModuleList items keep their "name.index" form), and
    our export wraps the UNet as attribute `unet`."""
    if not node_name.startswith("/"):
        return None
    parts = node_name.strip("/").split("/")[:-1]
    if parts and parts[0] == "unet":
        parts = parts[1:]
    return ".".join(parts) if parts else None


def plan_nodes(model, unet: torch.nn.Module, scope: Scope) -> tuple[list[str], list[str]]:
    """(nodes to quantize, Conv/MatMul/Gemm nodes to exclude) of the FP graph for `scope`.

    Raises if an in-scope module has no node: the name mapping broke and the comparison would
    silently quantize less than ours."""
    wanted = set(scope.quantized_modules(unet))
    quantize, exclude, found = [], [], set()
    for n in model.graph.node:
        if n.op_type not in OP_TYPES:
            continue
        mod = node_module(n.name)
        if mod in wanted:
            quantize.append(n.name)
            found.add(mod)
        else:
            exclude.append(n.name)
    missing = sorted(wanted - found)
    if missing:
        raise RuntimeError(f"no ONNX Conv/MatMul/Gemm node found for in-scope modules {missing[:5]} "
                           f"({len(missing)} in all): the node-name mapping does not fit this export")
    return quantize, exclude


def qdq_summary(path: Path) -> dict[str, Any]:
    """What a QDQ graph quantizes: Conv/MatMul/Gemm nodes whose activation input comes from a
    DequantizeLinear (`input_quantized`), those whose output feeds a QuantizeLinear
    (`output_quantized`: its own output quantization in the wide scope, or in ours the input
    quantization of a next quantized layer reading it directly, e.g. a downsampler conv feeding a
    conv_shortcut), and the node counts by op type."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inp, out = [], []
    for n in m.graph.node:
        if n.op_type not in OP_TYPES:
            continue
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "DequantizeLinear":
            inp.append(n.name)
        tail = n.output[0]
        # a MatMul's bias Add sits between it and its output Q in ORT's wide scope
        nxt = consumers.get(tail, [])
        if n.op_type == "MatMul" and len(nxt) == 1 and nxt[0].op_type == "Add":
            nxt = consumers.get(nxt[0].output[0], [])
        if any(c.op_type == "QuantizeLinear" for c in nxt):
            out.append(n.name)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"input_quantized": inp, "output_quantized": out, "op_counts": ops}


# --------------------------------------------------------------------------------------------
# export and calibration
# --------------------------------------------------------------------------------------------
def _graph_inputs(calib: CalibData, n: int = 2) -> dict[str, torch.Tensor]:
    """Export inputs in graph order (sample, timestep, conditioning): the first `n` calibration pairs."""
    x, t, cond = next(iter(calib.batches()))
    return {"sample": x[:n], "timestep": t[:n], **{k: v[:n] for k, v in cond.items()}}


def export_fp(unet: torch.nn.Module, calib: CalibData, workdir: Path, log: Log = print) -> Path:
    """The FP UNet as ONNX (our exporter, opset 19), then onnxruntime's quant_pre_process
    (ONNX shape inference; no graph optimization, which would rename the nodes the scope maps to,
    and no symbolic shape inference, which fails on diffusers UNets: "Incomplete symbolic shape
    inference"); the plain export if that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from adpdm_export.onnx_export import export_onnx

    workdir = Path(workdir).resolve()
    raw = workdir / "fp.onnx"
    export_onnx(unet, raw, _graph_inputs(calib))
    pre = workdir / "fp_pre.onnx"
    try:  # in workdir: symbolic shape inference, when it fails, saves sym_shape_infer_temp.onnx + data in the cwd
        with contextlib.chdir(workdir):
            quant_pre_process(str(raw), str(pre), skip_optimization=True, skip_symbolic_shape=True,
                              save_as_external_data=True, all_tensors_to_one_file=True,
                              external_data_location=pre.name + ".data")
        return pre
    except Exception as e:  # shape inference may not know every exported op
        log(f"[{NAME}] quant_pre_process failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"quantizing the plain export")
        return raw


class _OneBatch:
    """A CalibrationDataReader over one feed dict (one collect_data call per calibration batch)."""

    def __init__(self, feed: dict[str, np.ndarray]):
        self.feed: Optional[dict] = feed

    def get_next(self):
        feed, self.feed = self.feed, None
        return feed


def _feeds(calib: CalibData, input_names: list[str]):
    for x, t, cond in calib.batches():
        values = {"sample": x, "timestep": t, **cond}
        yield {n: np.ascontiguousarray(values[n].numpy().astype(
            np.int64 if n in ("timestep", "class_labels") else np.float32, copy=False)) for n in input_names}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def collect_ranges(fp_path: Path, calib: CalibData, method: str, tensors: set[str], workdir: Path,
                   threads: Optional[int] = None, percentile: Optional[float] = None):
    """Run onnxruntime's calibrator batch by batch; (TensorsData, info).

    `tensors`: the activations whose ranges the quantizer needs (the histogram calibrators are
    told to histogram only these; MinMax reduces everything it augmented, which is cheap)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    cm = getattr(CalibrationMethod, method)
    opts: dict[str, Any] = {}
    if cm == CalibrationMethod.Percentile:
        opts["percentile"] = float(percentile)
    aug = workdir / f"augmented_{method.lower()}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        cal = create_calibrator(fp_path, list(OP_TYPES), augmented_model_path=str(aug),
                                calibrate_method=cm, extra_options=opts)
    # its own session uses every core; the benchmark's thread budget instead
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    cal.infer_session = ort.InferenceSession(str(aug), sess_options=so, providers=["CPUExecutionProvider"])
    if hasattr(cal, "tensors_to_calibrate") and cal.tensors_to_calibrate is not None:
        cal.tensors_to_calibrate = set(cal.tensors_to_calibrate) & set(tensors)
    names = [i.name for i in cal.infer_session.get_inputs()]
    rss0, calls = _peak_rss_mb(), 0
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per histogram update
        for feed in _feeds(calib, names):
            cal.collect_data(_OneBatch(feed))
            calls += 1
        ranges = cal.compute_data()
    info: dict[str, Any] = {"collect_calls": calls, "peak_rss_mb": round(_peak_rss_mb(), 1),
                            "peak_rss_growth_mb": round(_peak_rss_mb() - rss0, 1)}
    collector = getattr(cal, "collector", None)
    if collector is not None:
        hists = collector.get_histogram_dict()
        info["histogram_bins_max"] = int(max(len(h[0]) for h in hists.values()))
        if cm == CalibrationMethod.Entropy:
            # does Entropy return plain MinMax (the whole histogram range clipped to the data's min/max)?
            same = sum(1 for k, h in hists.items()
                       if tuple(float(v) for v in ranges[k].range_value) == (float(h[2]), float(h[3])))
            info["entropy_equals_minmax"] = f"{same}/{len(hists)}"
    for f in (aug, Path(str(aug) + ".data")):
        f.unlink(missing_ok=True)
    return ranges, info


def _needed_tensors(model, nodes: list[str], wide: bool) -> set[str]:
    inits = {i.name for i in model.graph.initializer}
    want = set(nodes)
    out = set()
    for n in model.graph.node:
        if n.name in want:
            out.add(n.input[0])
            if n.op_type in ("MatMul",) and n.input[1] not in inits:
                out.add(n.input[1])
            if wide:
                out.update(n.output)
    return out - inits


def build_qdq(fp_path: Path, ranges, out_path: Path, nodes: list[str], exclude: list[str], cfg: _Config,
              workdir: Path) -> Path:
    """quantize_static on the precomputed ranges (fed through its calibration cache)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = workdir / f"ranges_{cfg.method.lower()}.json"
    save_tensors_data(ranges, cache)
    extra = {"ActivationSymmetric": cfg.activation_symmetric, "WeightSymmetric": True}
    if not cfg.wide:
        extra["OpTypesToExcludeOutputQuantization"] = list(OP_TYPES)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "consider pre-processing" warnings
    try:
        quantize_static(
            str(fp_path), str(out_path), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=cfg.reduce_range,
            activation_type=getattr(QuantType, cfg.activation_type), weight_type=QuantType.QInt8,
            nodes_to_quantize=list(nodes), nodes_to_exclude=list(exclude),
            calibrate_method=getattr(CalibrationMethod, cfg.method), extra_options=extra,
            calibration_cache_path=str(cache),
        )
    finally:
        logger.setLevel(level)
    return out_path


def restore_fp_consumers(path: Path, nodes: list[str], dry_run: bool = False) -> int:
    """Give FP consumers of a quantized activation back the FP tensor (in place); how many inputs.

    onnxruntime's QDQ quantizer rewires EVERY consumer of a tensor it quantizes to the
    DequantizeLinear output (`replace_input_of_all_nodes`; `DedicatedQDQPair` only splits pairs
    among several quantized consumers), so e.g. the GroupNorm reading a resnet's input next to
    its conv_shortcut would see quantized values: a residual quantization ours does not do.
    `dry_run`: only count them (the wide variant keeps onnxruntime's behaviour)."""
    import onnx

    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    keep = set(nodes)
    dq_to_fp = {}
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
            dq_to_fp[n.output[0]] = q.input[0]
    fixed = 0
    for n in m.graph.node:
        if n.name in keep or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(n.input):
            if name in dq_to_fp:
                n.input[i] = dq_to_fp[name]
                fixed += 1
    if fixed and not dry_run:
        onnx.save(m, str(path))
    return fixed


def _quantize_config(unet, calib: CalibData, scope: Scope, cfg: _Config, tag: str, workdir: Path,
                     log: Log = print, threads: Optional[int] = None) -> tuple[Path, dict, float]:
    """Export, calibrate and quantize with `cfg`; (QDQ graph, extra, wall seconds)."""
    import onnx

    from calibration.configs import DEFAULT_PERCENTILE

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp = export_fp(unet, calib, workdir, log)
    t_export = time.perf_counter() - t0
    model = onnx.load(str(fp), load_external_data=False)
    nodes, exclude = plan_nodes(model, unet, scope)
    need = _needed_tensors(model, nodes, cfg.wide)
    t1 = time.perf_counter()
    ranges, info = collect_ranges(fp, calib, cfg.method, need, workdir, threads=threads,
                                  percentile=DEFAULT_PERCENTILE)
    t_collect = time.perf_counter() - t1
    out = build_qdq(fp, ranges, workdir / f"qdq_{tag}.onnx", nodes, exclude, cfg, workdir)
    restored = restore_fp_consumers(out, nodes, dry_run=cfg.wide)
    wall = time.perf_counter() - t0
    summary = qdq_summary(out)
    n_scope = len(scope.quantized_modules(unet))
    got = summary["input_quantized"]
    extra = {
        "quantized_nodes": len(got),
        "scope_modules": n_scope,
        "output_quantized_nodes": len(summary["output_quantized"]),
        "unexpected_quantized": sorted(set(got) - set(nodes)),
        "not_quantized": sorted(set(nodes) - set(got)),
        "excluded_nodes": len(exclude),
        # FP nodes (GroupNorm, Add, ...) ORT had rewired to a DQ output: given back the FP tensor
        # in our scope, left quantized in the wide one
        "fp_consumers_of_quantized": restored,
        "calibration_pairs": calib.num_forward_passes,
        "export_s": round(t_export, 2),
        "collect_s": round(t_collect, 2),
        "fp_graph": str(fp),
        **info,
    }
    log(f"[{NAME}:{tag}] {len(got)} Conv/MatMul/Gemm nodes with quantized inputs (scope: {n_scope} modules), "
        f"{len(summary['output_quantized'])} with quantized outputs; calibration {wall:.1f} s "
        f"({info['collect_calls']} collect_data calls, peak RSS {info['peak_rss_mb']:.0f} MB)")
    if extra["unexpected_quantized"] or extra["not_quantized"]:
        log(f"[{NAME}:{tag}] scope mismatch: extra {extra['unexpected_quantized'][:3]}, "
            f"missing {extra['not_quantized'][:3]}")
    return out, extra, wall


def quantize(unet, calib: CalibData, scope: Scope, variant: str, workdir: Path, log: Log = print) -> PeerModel:
    """The `variant` QDQ graph of `unet` on `calib`, as an onnxruntime session behind SessionUNet."""
    from engines.ort_backend import make_session

    if variant not in _CONFIGS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; known: {', '.join(VARIANTS)}")
    if (scope.w_bits, scope.a_bits) != (8, 8):
        raise ValueError(f"{NAME} supports W8A8 only (onnxruntime has no {scope.a_bits}-bit activation type)")
    cfg = _CONFIGS[variant]
    path, extra, wall = _quantize_config(unet, calib, scope, cfg, variant, Path(workdir), log)
    notes = [
        f"ORT's calibrator keeps all intermediates of one collect_data call in RAM and "
        f"CalibMaxIntermediateOutputs drops MinMax data, so ranges were collected batch by batch "
        f"({extra['collect_calls']} collect_data calls over {extra['calibration_pairs']} pairs, "
        f"peak RSS {extra['peak_rss_mb']:.0f} MB) and fed to quantize_static through its calibration cache.",
    ]
    if extra["fp_consumers_of_quantized"]:
        notes.append(
            f"ORT's QDQ quantizer rewires every consumer of a quantized tensor to its DequantizeLinear "
            f"({extra['fp_consumers_of_quantized']} FP-node inputs here, e.g. the GroupNorm next to a conv_shortcut); "
            + ("left as ORT makes it (its own scope)." if cfg.wide else
               "given back the FP tensor so only Conv/MatMul/Gemm inputs are quantized, as in ours."))
    if "entropy_equals_minmax" in extra:
        notes.append(
            f"Entropy (default 128 bins / 128 quantized bins) returned exactly the MinMax range for "
            f"{extra['entropy_equals_minmax']} tensors (histograms grew to {extra['histogram_bins_max']} bins "
            f"while merging batches; in one pass 128 bins leave KL a single candidate, the full range).")
    if extra["quantized_nodes"] != extra["scope_modules"]:
        notes.append(f"quantized nodes {extra['quantized_nodes']} != scope modules {extra['scope_modules']}.")
    session = make_session(path, threads=torch.get_num_threads())
    return PeerModel(model=SessionUNet(session), calibration_s=wall, onnx_path=path, notes=notes, extra=extra)


def fastest_qdq_graph(unet, calib: CalibData, scope: Scope, workdir: Path, log: Log = print) -> Path:
    """The QDQ graph bench_speed times as "onnxruntime quantize_static, fastest variant" (FASTEST:
    "minmax-wide" with uint8 asymmetric activations), calibrated on `calib` like the others."""
    path, _, _ = _quantize_config(unet, calib, scope, FASTEST, "fastest", Path(workdir), log)
    return path
