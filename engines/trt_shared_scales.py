"""ONE TensorRT engine for all G timestep groups: unit-scale Q/DQ, per-group scales as a runtime input (issue 16).

TensorRT requires the scale of a Quantize/Dequantize layer to be a build-time constant
(operator reference, "Quantize": "The scale tensor must be a build-time constant"), so G groups
with different activation scales are G engines and G copies of the weights on the GPU. The
TensorRT-target graphs quantize only the *inputs* of Conv and MatMul (docs/design.md), which makes
an exact-up-to-float-rounding rewrite possible where the scale leaves the Q/DQ pair:

    Q(x, s) -> DQ(., s) -> Conv(., W, b)            (group graph k, s = group k's scale)
    Div(x, s) -> Q(., 1) -> DQ(., 1) -> Conv(., W) -> Mul(., s) -> Add(., b)   (shared graph)

round(x / s) is the same integer either way; Conv is linear in its input, so Conv(q * s, W) =
s * Conv(q, W) up to float rounding; the bias moves after the multiply. MatMul inputs are handled the
same way (their bias Add already follows). `s` is element i of a graph input
`adpdm_group_scales` (float32 [Q], Q = activation quantizers), fed per call with group k's row of
`unet.shared.trt.scales.npz`. Every Q/DQ scale is then the constant 1.0, the Div/Mul are pointwise
layers TensorRT may fuse into the neighbouring kernels, and the weights exist once.
The graphs' high precision (FP16 by default, BF16 or FP32: adpdm_export/high_precision.py) is kept:
the unit scale, the moved biases and the gathered scales take the graph's scale type, and the
float32 runtime input is cast to it once.

Written against TensorRT 10 and checked here only with onnxruntime (the rewrite's arithmetic, on
CPU): whether TensorRT keeps every Conv/MatMul in INT8 with these pointwise neighbours, and at what
speed, is measured by `tools/trt_check.py --shared-scales` on a GPU (docs/runtime.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engines.errors import AdpdmError

GROUP_SCALES_INPUT = "adpdm_group_scales"
SHARED_TRT_GRAPH_NAME = "unet.shared.trt.onnx"
SHARED_TRT_SCALES_NAME = "unet.shared.trt.scales.npz"
SHARED_ENGINE_NAME = "unet.shared.plan"
_UNIT = "adpdm.unit_scale"


@dataclass
class SharedScaleFiles:
    graph: Path
    scales: Path
    quantizers: list[str]  # scale initializer names, in the order of the input's elements


def _typed(value: np.ndarray, elem: int, name: str):
    """An initializer of ONNX type `elem` (FP32, FP16 or BF16) holding `value`."""
    from onnx import helper, numpy_helper

    if elem == 16:  # BFLOAT16: numpy has no such type; onnx stores it from float32
        return helper.make_tensor(name, elem, value.shape, np.asarray(value, dtype=np.float32).ravel().tolist())
    return numpy_helper.from_array(np.asarray(value).astype(helper.tensor_dtype_to_np_dtype(elem)), name)


def _check_same_template(models) -> None:
    ref = [(n.op_type, tuple(n.input), tuple(n.output)) for n in models[0].graph.node]
    for k, m in enumerate(models[1:], 1):
        if [(n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node] != ref:
            raise AdpdmError(f"TensorRT group graphs 0 and {k} differ in their nodes: not one template with other scales")


def shared_scale_graph(group_graphs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> SharedScaleFiles:
    """Write the shared-scale graph (weights stay in the group graphs' external file, so write it beside
    them) and the [G, Q] scales of `group_graphs` (the TensorRT-target graphs, in group order)."""
    import onnx
    from onnx import helper, numpy_helper

    graphs = [Path(g) for g in group_graphs]
    out = Path(out_dir)
    if any(g.parent.resolve() != out.resolve() for g in graphs):
        raise AdpdmError("write the shared-scale graph beside the group graphs (it references their weights file)")
    models = [onnx.load(str(g), load_external_data=False) for g in graphs]
    _check_same_template(models)
    m = models[0]
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    # the activation Q nodes (input not an initializer) and their DQ partners
    quantizers: list[str] = []
    pairs = []
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        scale = q.input[1]
        if scale not in inits:
            raise AdpdmError(f"Q node {q.name} has a non-constant scale")
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.input[1] != scale for d in dqs):
            raise AdpdmError(f"Q node {q.name} is not followed by DequantizeLinear nodes with its scale")
        for d in dqs:
            for c in consumers.get(d.output[0], []):
                if c.op_type not in ("Conv", "MatMul") or list(c.input).index(d.output[0]) != 0:
                    raise AdpdmError(f"activation quantizer {scale} feeds {c.op_type} {c.name}: only Conv/MatMul "
                                     "inputs can carry their scale out of the Q/DQ pair")
        if scale not in quantizers:
            quantizers.append(scale)
        pairs.append((q, dqs))
    if not quantizers:
        raise AdpdmError("the graph has no activation Q/DQ pairs")
    table = np.stack([np.array([float(np.asarray(numpy_helper.to_array({t.name: t for t in mm.graph.initializer}[s],
                                                                       base_dir=str(out))).astype(np.float32))
                                for s in quantizers], dtype=np.float32) for mm in models])

    # The scales' type is the graph's high precision (FP32, FP16 or BF16: strongly typed Q/DQ);
    # the runtime input stays float32 and is cast once.
    elem = inits[quantizers[0]].data_type
    new_nodes = []
    new_inits = [_typed(np.array(1.0, dtype=np.float32), elem, _UNIT)]
    scales_in = GROUP_SCALES_INPUT
    if elem != onnx.TensorProto.FLOAT:
        scales_in = f"{GROUP_SCALES_INPUT}.cast"
        new_nodes.append(helper.make_node("Cast", [GROUP_SCALES_INPUT], [scales_in], to=elem,
                                          name=f"{GROUP_SCALES_INPUT}.cast"))
    index_of = {s: i for i, s in enumerate(quantizers)}
    after: dict[str, list] = {}  # node output name -> nodes to insert after the node that produces it
    for s, i in index_of.items():
        new_inits.append(numpy_helper.from_array(np.array(i, dtype=np.int64), f"{s}.index"))
        new_nodes.append(helper.make_node("Gather", [scales_in, f"{s}.index"], [f"{s}.runtime"], axis=0,
                                          name=f"{s}.gather"))
    for q, dqs in pairs:
        s = q.input[1]
        x = q.input[0]
        scaled = f"{q.output[0]}.prescaled"
        q.input[0] = scaled
        q.input[1] = _UNIT
        new_nodes.append(helper.make_node("Div", [x, f"{s}.runtime"], [scaled], name=f"{q.name}.div"))
        for d in dqs:
            d.input[1] = _UNIT
            for c in consumers.get(d.output[0], []):
                y = c.output[0]
                raw = f"{y}.unit"
                c.output[0] = raw
                nodes = []
                if c.op_type == "Conv" and len(c.input) > 2 and c.input[2]:
                    b = c.input[2]
                    if b not in inits:
                        raise AdpdmError(f"Conv {c.name} has a non-constant bias")
                    bias = numpy_helper.to_array(inits[b], base_dir=str(graphs[0].parent))
                    new_inits.append(_typed(bias.reshape(1, -1, 1, 1), inits[b].data_type, f"{b}.nchw"))
                    del c.input[2]
                    nodes.append(helper.make_node("Mul", [raw, f"{s}.runtime"], [f"{y}.scaled"], name=f"{c.name}.scale"))
                    nodes.append(helper.make_node("Add", [f"{y}.scaled", f"{b}.nchw"], [y], name=f"{c.name}.bias"))
                else:
                    nodes.append(helper.make_node("Mul", [raw, f"{s}.runtime"], [y], name=f"{c.name}.scale"))
                after[raw] = nodes
    ordered = list(new_nodes)
    for n in g.node:
        ordered.append(n)
        for o in n.output:
            ordered.extend(after.get(o, []))
    del g.node[:]
    g.node.extend(ordered)
    used = {i for n in ordered for i in n.input}
    keep = [t for t in g.initializer if t.name not in set(quantizers) and t.name in used]  # moved biases dropped
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    g.input.append(helper.make_tensor_value_info(GROUP_SCALES_INPUT, onnx.TensorProto.FLOAT, [len(quantizers)]))
    graph_path, scales_path = out / SHARED_TRT_GRAPH_NAME, out / SHARED_TRT_SCALES_NAME
    onnx.save_model(m, str(graph_path))  # external weights stay references into the group graphs' file
    with open(scales_path, "wb") as f:
        np.savez(f, names=np.array(quantizers, dtype=np.str_), scales=table)
    return SharedScaleFiles(graph_path, scales_path, quantizers)


def load_group_scales(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(scale names, [G, Q] float32 table) of a `unet.shared.trt.scales.npz`."""
    with np.load(path, allow_pickle=False) as z:
        return [str(n) for n in z["names"]], np.ascontiguousarray(z["scales"], dtype=np.float32)


__all__ = [
    "GROUP_SCALES_INPUT",
    "SHARED_ENGINE_NAME",
    "SHARED_TRT_GRAPH_NAME",
    "SHARED_TRT_SCALES_NAME",
    "SharedScaleFiles",
    "load_group_scales",
    "shared_scale_graph",
]
