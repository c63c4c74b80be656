"""The onnxruntime CPU target: the TensorRT-target graph plus output Q/DQ, uint8 zero points.

docs/design.md ("Quantization contract") explains why: onnxruntime's CPU QDQ fusion turns
`DQ -> Conv -> Q` into QLinearConv only when the Conv's output is quantized too, and with
int8 activation zero points it leaves ops whose input has several consumers unfused.
So `make_ort_target` takes the TensorRT-target template and

1. after every quantized Conv / Gemm (its output) and every quantized MatMul (after its
   bias Add when the Linear has one, which is where the calibration wrapper's
   `output_quantizer` sits) inserts QuantizeLinear -> DequantizeLinear with the scale
   initializer `{layer}.output_quantizer.scale`;
2. turns the shared activation zero point from int8 0 into uint8 128: the same grid
   (q_u8 = q_s8 + 128), so the numerics do not change. Weights keep int8 zero points
   (onnxruntime's U8S8 kernels).

`fusion_counts` runs onnxruntime's optimizer on a graph and counts how many of its
quantized Conv/MatMul/Gemm became integer kernels (QLinearConv, QLinearMatMul,
MatMulIntegerToFloat, QGemm, ...).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adpdm_export.qdq_graph_passes import ACT_ZERO_POINT, SCALE_SUFFIX, GraphIndex, module_path_of
from engines.errors import AdpdmError

OUTPUT_QUANTIZER = "output_quantizer"
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# onnxruntime kernels a quantized Conv/MatMul/Gemm becomes when its QDQ group is fused.
FUSED_OP_TYPES = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "QAttention",
)
MIN_FUSED_RATIO = 0.95


@dataclass
class QuantizedOp:
    node: str  # the Conv / MatMul / Gemm node
    op_type: str
    layer: str  # its module path in the UNet
    output: str  # the layer's output tensor (after a MatMul's bias Add)
    weight_dq: str


def quantized_ops(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[QuantizedOp]:
    """Conv / MatMul / Gemm nodes whose weight comes through a DequantizeLinear (maybe via Transpose)."""
    ix = index or GraphIndex(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OP_TYPES or len(n.input) < 2:
            continue
        p = ix.producer.get(n.input[1])
        if p is not None and p.op_type == "Transpose":
            p = ix.producer.get(p.input[0])
        if p is None or p.op_type != "DequantizeLinear" or not ix.is_const(p.input[0]):
            continue
        layer = module_path_of(n.name)
        output = n.output[0]
        if n.op_type == "MatMul":
            cons = ix.consumers.get(output, [])
            if len(cons) == 1 and cons[0].op_type == "Add" and module_path_of(cons[0].name) == layer:
                other = [i for i in cons[0].input if i != output]
                if len(other) == 1 and ix.is_const(other[0]):
                    output = cons[0].output[0]
        out.append(QuantizedOp(n.name, n.op_type, layer, output, p.name))
    return out


def add_output_qdq(
    model: onnx.ModelProto,
    scale_of: Callable[[str], float],
    zero_point_name: str = ACT_ZERO_POINT,
) -> list[str]:
    """Insert Q/DQ on the output of every quantized Conv/MatMul/Gemm (in place).

    `scale_of(output_quantizer_name)` gives the scale; the initializer is named
    `{layer}.output_quantizer.scale`. Returns the output-quantizer names, in graph order.
    """
    ix = GraphIndex(model)
    if zero_point_name not in ix.inits:
        raise AdpdmError(f"the graph has no shared activation zero point {zero_point_name!r}")
    ops = quantized_ops(model, ix)
    if not ops:
        raise AdpdmError("the graph has no quantized Conv/MatMul/Gemm to add output Q/DQ to")
    by_output: dict[str, tuple[QuantizedOp, list[onnx.NodeProto]]] = {}
    names = []
    new_inits = []
    for op in ops:
        qname = f"{op.layer}.{OUTPUT_QUANTIZER}"
        if op.output in ix.graph_outputs:
            raise AdpdmError(f"{op.node}: its output is a graph output; cannot add output Q/DQ there")
        scale_name = qname + SCALE_SUFFIX
        if scale_name in ix.inits:
            raise AdpdmError(f"{scale_name} already exists: output Q/DQ were added before")
        value = np.float32(scale_of(qname))
        if not np.isfinite(value) or value <= 0:
            raise AdpdmError(f"{qname}: scale must be finite and > 0, got {value}")
        new_inits.append(numpy_helper.from_array(np.asarray(value, np.float32), scale_name))
        scope = "/" + "/".join(["unet", *op.node.strip("/").split("/")[1:-1], OUTPUT_QUANTIZER])
        q_out, dq_out = f"{scope}/QuantizeLinear_output_0", f"{scope}/DequantizeLinear_output_0"
        q = helper.make_node("QuantizeLinear", [op.output, scale_name, zero_point_name], [q_out], name=f"{scope}/QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [q_out, scale_name, zero_point_name], [dq_out], name=f"{scope}/DequantizeLinear")
        by_output[op.output] = (op, [q, dq])
        names.append(qname)
    # rewire consumers, then insert each pair right after the node producing the output
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in by_output:
                n.input[i] = by_output[name][1][1].output[0]
    nodes = []
    for n in model.graph.node:
        nodes.append(n)
        for o in n.output:
            if o in by_output:
                nodes.extend(by_output[o][1])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    return names


def set_zero_point_uint8(model: onnx.ModelProto, zero_point_name: str = ACT_ZERO_POINT) -> None:
    """Shared activation zero point int8 0 -> uint8 128 (the same grid), in place."""
    for t in model.graph.initializer:
        if t.name == zero_point_name:
            v = numpy_helper.to_array(t)
            if v.dtype == np.uint8 and int(v) == 128:
                return
            if v.dtype != np.int8 or int(v) != 0:
                raise AdpdmError(f"{zero_point_name} is {v.dtype} {v}, expected int8 0")
            t.CopyFrom(numpy_helper.from_array(np.asarray(128, np.uint8), zero_point_name))
            return
    raise AdpdmError(f"the graph has no shared activation zero point {zero_point_name!r}")


def make_ort_target(trt_template: onnx.ModelProto, scale_of: Callable[[str], float]) -> tuple[onnx.ModelProto, list[str]]:
    """The onnxruntime-target template from the TensorRT-target template (which is not changed)."""
    m = onnx.ModelProto()
    m.CopyFrom(trt_template)
    names = add_output_qdq(m, scale_of)
    set_zero_point_uint8(m)
    return m, names


# --------------------------------------------------------------------------- fusion counts


@dataclass
class FusionCounts:
    quantized: dict[str, int]  # quantized Conv/MatMul/Gemm in the graph, by op type
    fused: dict[str, int]  # integer kernels in the optimized graph, by op type
    unfused: list[str] = field(default_factory=list)  # quantized ops left as float ops
    level: str = "extended"

    @property
    def total(self) -> int:
        return sum(self.quantized.values())

    @property
    def fused_total(self) -> int:
        return min(sum(self.fused.values()), self.total)

    @property
    def ratio(self) -> float:
        return self.fused_total / self.total if self.total else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, fused_total=self.fused_total, ratio=round(self.ratio, 4))
        return d

    def summary(self) -> str:
        q = ", ".join(f"{k} {v}" for k, v in sorted(self.quantized.items()))
        f = ", ".join(f"{k} {v}" for k, v in sorted(self.fused.items())) or "none"
        return f"{self.fused_total}/{self.total} quantized ops fused ({q}; fused as {f})"


def fusion_counts(graph_path: str | os.PathLike, level: str = "extended", threads: int = 1) -> FusionCounts:
    """Optimize `graph_path` with onnxruntime's CPU provider and count the fused quantized ops."""
    from engines.ort_backend import _import_ort

    ort = _import_ort()
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise AdpdmError(f"unknown optimization level {level!r}")
    graph_path = Path(graph_path)
    src = onnx.load(str(graph_path), load_external_data=False)
    src_ops = quantized_ops(src)
    quantized = dict(Counter(op.op_type for op in src_ops))
    with tempfile.TemporaryDirectory(prefix="adpdm-fusion-") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = str(opt_path)
        so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "256")
        ort.InferenceSession(str(graph_path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(opt_path), load_external_data=False)
    fused = Counter(n.op_type for n in opt.graph.node if n.op_type in FUSED_OP_TYPES)
    # Quantized ops still computed in float: a Conv/MatMul/Gemm (any domain) reading a DQ output.
    ix = GraphIndex(opt)
    unfused = []
    for n in opt.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"):
            continue
        for i in n.input[1:2]:
            p = ix.producer.get(i)
            if p is not None and p.op_type == "Transpose":
                p = ix.producer.get(p.input[0])
            if p is not None and p.op_type == "DequantizeLinear" and ix.is_const(p.input[0]):
                unfused.append(n.name)
    return FusionCounts(quantized=quantized, fused=dict(fused), unfused=unfused, level=level)


__all__ = [
    "FUSED_OP_TYPES",
    "FusionCounts",
    "MIN_FUSED_RATIO",
    "QuantizedOp",
    "add_output_qdq",
    "fusion_counts",
    "make_ort_target",
    "quantized_ops",
    "set_zero_point_uint8",
]
