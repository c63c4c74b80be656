"""The TensorRT target in FP16 or BF16 outside the INT8 layers (`--high-precision fp16|bf16|fp32`).

TensorRT builds our graphs as strongly typed networks: every layer runs in the type the ONNX graph
gives its tensors, so an FP32 graph runs GroupNorm, SiLU, softmax, the non-quantized matmuls and the
residual adds in FP32, while the baseline users compare with is an FP16 engine. `convert` rewrites
the FP32 TensorRT-target template so that every float tensor is FP16 (or BF16), scales and
DequantizeLinear outputs included (a strongly typed DQ outputs its scale's type), except the
documented FP32 islands (`fp32_islands`, measured in docs/export.md):

* ``embedding``: every node that does not depend on a float graph input of rank >= 3 (`sample`,
  `encoder_hidden_states`): the sinusoidal timestep projection, the time (and class / added)
  embedding MLP, each resnet's `time_emb_proj`. Sin/cos take arguments up to T-1 = 999, where FP16's
  spacing is 0.5 (BF16's 4): the phases would be noise. diffusers itself computes that projection in
  FP32 in its FP16 pipelines. These are (B, D) vectors: negligible work.
* ``normalization``: InstanceNormalization / LayerNormalization / GroupNormalization (GroupNorm is
  traced as InstanceNormalization) take an FP32 input and give an FP32 output, Casts around them:
  their statistics square the activations, and FP16 overflows at 65504 (|x| > 256); PyTorch's
  autocast keeps group_norm and layer_norm in FP32 for the same reason. The affine Mul/Add after
  them run in the high precision.
* ``io``: the graph's inputs and output stay FP32 with a Cast at each edge, so the runner, the
  TensorRT backend, Triton configs and the manifest see the same I/O for every precision.

Constant-only subgraphs (weight DequantizeLinear, shape arithmetic) take the type of their readers.
Scales below the high type's smallest normal number cannot be stored: weight channels with such a
scale are requantized onto the smallest normal scale (their values are below 127 * that scale
anyway); an activation scale that small is lifted to that number (`normal_scale`; the simulation the
parity check compares with is lifted the same way): it belongs to a tensor that is zero or nearly so
on every calibration input (e.g. a cross-attention K/V input calibrated on all-zero null embeddings),
whose values the high precision could not represent anyway. The report counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adpdm_export import qdq_graph_passes as P
from engines.errors import AdpdmError

PRECISIONS = ("fp16", "bf16", "fp32")
DEFAULT_TRT = "fp16"
ELEM_TYPE = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT}
NP_TYPE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
KEEP_FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
SHAPE_OPS = ("Shape", "Size")
# BF16 Conv and InstanceNormalization exist from opset 22 (19 has BF16 Q/DQ, MatMul, Gemm, Softmax, but
# not Conv); FP16 needs nothing newer than the FP32 graph's opset.
MIN_OPSET = {"fp16": 19, "bf16": 22, "fp32": 19}
FLOAT_ELEMS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
CAST_SUFFIX = ".cast_"


def parse_high_precision(value: str | None, targets) -> str:
    """The precision of the TensorRT target's non-quantized part: fp16 by default where the trt target
    is exported; the onnxruntime CPU target is always FP32, so an explicit fp16/bf16 without the trt
    target is refused (it would change nothing)."""
    if value is None:
        return DEFAULT_TRT if "trt" in targets else "fp32"
    if value not in PRECISIONS:
        raise AdpdmError(f"unknown high precision {value!r}: use fp16, bf16 or fp32")
    if value != "fp32" and "trt" not in targets:
        raise AdpdmError(
            f"--high-precision {value} applies to the TensorRT target only; the onnxruntime CPU target is always FP32 "
            "(export with --target trt or both, or drop the flag)")
    return value


def precision_of_type(elem: int) -> str:
    return {v: k for k, v in ELEM_TYPE.items()}.get(elem, TensorProto.DataType.Name(elem).lower())


def tiny(precision: str) -> float:
    """The smallest normal positive number of `precision`."""
    return float(ml_dtypes.finfo(NP_TYPE[precision]).tiny) if precision == "bf16" else float(np.finfo(NP_TYPE[precision]).tiny)


def normal_scale(value: float, precision: str) -> float:
    """An activation scale the high precision can hold: values below its smallest normal number are
    lifted to it (module doc); FP32 scales pass unchanged."""
    value = float(value)
    return value if precision == "fp32" else max(value, tiny(precision))


def to_precision(value: np.ndarray, precision: str) -> np.ndarray:
    return np.asarray(value).astype(NP_TYPE[precision])


def stream_inputs(model: onnx.ModelProto) -> list[str]:
    """The float graph inputs of rank >= 3: the spatial / sequence tensors the network runs on."""
    out = []
    for i in model.graph.input:
        tt = i.type.tensor_type
        if tt.elem_type in FLOAT_ELEMS and tt.HasField("shape") and len(tt.shape.dim) >= 3:
            out.append(i.name)
    return out


def fp32_islands(model: onnx.ModelProto) -> dict[int, str]:
    """{index of node: reason} of the nodes that run in FP32 in a high-precision graph: 'embedding'
    (computed from the graph inputs but not from a stream input) and 'normalization'. Constant-only
    nodes are not listed: they take the type their readers want (`convert`)."""
    reach: set[str] = set(stream_inputs(model))
    dynamic: set[str] = {i.name for i in model.graph.input}
    out: dict[int, str] = {}
    for k, n in enumerate(model.graph.node):  # ONNX nodes are topologically sorted
        ins = [i for i in n.input if i]
        if not any(i in dynamic for i in ins):
            continue
        dynamic.update(o for o in n.output if o)
        if any(i in reach for i in ins):
            if n.op_type not in SHAPE_OPS:  # a shape read from the sample is metadata, not data
                reach.update(o for o in n.output if o)
            if n.op_type in KEEP_FP32_OPS:
                out[k] = "normalization"
        else:
            out[k] = "embedding"
    return out


def _schema_inputs(node: onnx.NodeProto, opset: int) -> list[set[str]]:
    """Per input position, the type strings the op's schema allows there."""
    try:
        s = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # noqa: BLE001 - unknown op: no constraint known
        return []
    cons = {c.type_param_str: set(c.allowed_type_strs) for c in s.type_constraints}
    out = []
    for p in s.inputs:
        out.append(cons.get(p.type_str, {p.type_str}))
    if out and s.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        out.extend([out[-1]] * (len(node.input) - len(out)))
    return out


_TYPE_STR = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)",
             TensorProto.FLOAT: "tensor(float)"}


def precision_violations(model: onnx.ModelProto, types: dict[str, int], expect: str | None = None) -> list[tuple[str, str]]:
    """(node, problem) for every place a high-precision graph leaves its type outside the FP32 islands
    (the linter's `high-precision` rule): float graph inputs / outputs not FP32, and nodes outside
    `fp32_islands` (Casts, shape reads and constant-only nodes that only FP32 islands read aside) with a
    float input or output of another type than the graph's high precision (`expect`, or the type most
    such tensors have). `types`: element type per tensor name. An FP32 graph passes trivially."""
    g = model.graph
    out: list[tuple[str, str]] = []
    for vi in list(g.input) + list(g.output):
        t = vi.type.tensor_type.elem_type
        if t in FLOAT_ELEMS and t != TensorProto.FLOAT:
            out.append((vi.name, f"graph input/output is {precision_of_type(t)}: the runner feeds and reads float32"))
    islands = fp32_islands(model)
    opset = P.opset_version(model)
    ix = P.GraphIndex(model)
    nodes = list(g.node)
    pos = {id(n): k for k, n in enumerate(nodes)}
    dynamic = {i.name for i in g.input}
    checked: dict[int, bool] = {}
    for k, n in enumerate(nodes):
        if any(i in dynamic for i in n.input if i):
            dynamic.update(o for o in n.output if o)
            checked[k] = k not in islands
    for k in range(len(nodes) - 1, -1, -1):  # constant-only nodes count where a checked node reads them
        if k not in checked:
            readers = [pos[id(c)] for o in nodes[k].output for c in ix.consumers.get(o, [])]
            checked[k] = nodes[k].op_type != "Constant" and any(checked.get(r, False) for r in readers)
    seen: dict[int, int] = {}
    per_node: list[tuple[int, list[tuple[int, int | None]]]] = []
    for k, n in enumerate(nodes):
        if not checked[k] or n.op_type == "Cast" or n.op_type in SHAPE_OPS:
            continue
        allowed = _schema_inputs(n, opset)
        io = [(types.get(i), j) for j, i in enumerate(n.input) if i] + [(types.get(o), None) for o in n.output if o]
        io = [(t, j) for t, j in io if t in FLOAT_ELEMS]
        for t, j in io:
            seen[t] = seen.get(t, 0) + 1
        per_node.append((k, io, allowed))
    if not seen:
        return out
    want = ELEM_TYPE[expect] if expect else max(seen, key=seen.get)
    for k, io, allowed in per_node:
        n = nodes[k]
        for t, j in io:
            if t == want:
                continue
            if j is not None and j < len(allowed) and _TYPE_STR.get(want) not in allowed[j]:
                continue  # the op's schema has no `want` there (Resize scales): FP32 by definition
            where = f"input {n.input[j]!r}" if j is not None else "an output"
            out.append((n.name or n.op_type, f"{n.op_type} has {where} in {precision_of_type(t)} outside the FP32 islands "
                                             f"(graph precision {precision_of_type(want)})"))
            break
    return out


@dataclass
class Conversion:
    precision: str
    low_nodes: int = 0
    islands: dict[str, int] = field(default_factory=dict)  # reason -> node count
    casts: int = 0
    requantized_channels: int = 0
    lifted_activation_scales: int = 0  # (scale, group) values below the smallest normal number (normal_scale)

    def to_dict(self) -> dict:
        return {"precision": self.precision, "low_precision_nodes": self.low_nodes, "fp32_islands": dict(self.islands),
                "casts_inserted": self.casts, "requantized_weight_channels": self.requantized_channels,
                "lifted_activation_scales": self.lifted_activation_scales}


def convert(model: onnx.ModelProto, precision: str) -> tuple[onnx.ModelProto, Conversion]:
    """A copy of the FP32 TensorRT-target template with every float tensor in `precision` except the
    FP32 islands and the graph I/O (module docstring); weights must be inline. fp32: a plain copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    info = Conversion(precision)
    if precision == "fp32":
        return out, info
    if precision not in ELEM_TYPE:
        raise AdpdmError(f"unknown high precision {precision!r}: use fp16, bf16 or fp32")
    low = ELEM_TYPE[precision]
    g = out.graph
    if P.opset_version(out) < MIN_OPSET[precision]:
        P.set_opset(out, MIN_OPSET[precision])
    opset = P.opset_version(out)
    inferred = onnx.shape_inference.infer_shapes(_without_weight_bytes(out), check_type=True, strict_mode=True)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    islands = fp32_islands(out)
    for r in islands.values():
        info.islands[r] = info.islands.get(r, 0) + 1
    ix = P.GraphIndex(out)
    nodes = list(g.node)
    pos = {id(n): k for k, n in enumerate(nodes)}
    outputs = {o.name for o in g.output}
    dynamic: set[str] = {i.name for i in g.input}
    is_dyn = []
    for n in nodes:
        is_dyn.append(any(i in dynamic for i in n.input if i))
        if is_dyn[-1]:
            dynamic.update(o for o in n.output if o)
    schemas = [_schema_inputs(n, opset) for n in nodes]

    def accepts_low(k: int, j: int) -> bool:
        allowed = schemas[k]
        return j >= len(allowed) or _TYPE_STR[low] in allowed[j]

    # Placement (True: the node computes in the high precision). Constant-only nodes follow their
    # readers, decided first (reverse topological order).
    place: dict[int, bool] = {}
    for k in range(len(nodes) - 1, -1, -1):
        n = nodes[k]
        if k in islands:
            place[k] = False
        elif is_dyn[k]:
            place[k] = True
        else:
            readers = [(pos[id(c)], j) for o in n.output for c in ix.consumers.get(o, []) for j, x in enumerate(c.input) if x == o]
            place[k] = any(place[r] and accepts_low(r, j) for r, j in readers) or any(o in outputs for o in n.output)

    def wants(k: int, j: int) -> int:
        return low if place[k] and accepts_low(k, j) else TensorProto.FLOAT

    # Float initializers: converted where a reader wants the high precision (an FP32 copy for the others).
    want_of: dict[str, set[int]] = {}
    for k, n in enumerate(nodes):
        for j, i in enumerate(n.input):
            if i and types.get(i) == TensorProto.FLOAT:
                want_of.setdefault(i, set()).add(wants(k, j))
    rename: dict[tuple[int, int], str] = {}
    new_inits = []
    for t in g.initializer:
        if t.data_type != TensorProto.FLOAT or low not in want_of.get(t.name, set()):
            continue
        arr = numpy_helper.to_array(t)
        if TensorProto.FLOAT in want_of[t.name]:
            keep = numpy_helper.from_array(arr, t.name + CAST_SUFFIX + "fp32")
            new_inits.append(keep)
            for k, n in enumerate(nodes):
                for j, i in enumerate(n.input):
                    if i == t.name and wants(k, j) == TensorProto.FLOAT:
                        rename[(k, j)] = keep.name
        t.CopyFrom(numpy_helper.from_array(to_precision(arr, precision), t.name))
    g.initializer.extend(new_inits)
    for (k, j), new in rename.items():
        nodes[k].input[j] = new
    # Float-typed attributes of high-precision nodes.
    for k, n in enumerate(nodes):
        if not place[k]:
            continue
        if n.op_type == "Cast" and P.attr(n, "to") == TensorProto.FLOAT:
            P.set_attr(n, "to", low)
        for a in n.attribute:
            if n.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(to_precision(numpy_helper.to_array(a.t), precision), a.t.name))

    # Types after the rewrite, then a Cast wherever a float tensor reaches a reader wanting the other
    # type (one per tensor and type, right after its producer; graph inputs at the top).
    new_type = {i.name: TensorProto.FLOAT for i in g.input if types.get(i.name) == TensorProto.FLOAT}
    new_type.update({t.name: t.data_type for t in g.initializer if t.data_type in (TensorProto.FLOAT, low)})
    for k, n in enumerate(nodes):
        for o in n.output:
            if o and types.get(o) == TensorProto.FLOAT:
                new_type[o] = low if place[k] and n.op_type not in SHAPE_OPS else TensorProto.FLOAT
    producer_pos = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    casts: dict[tuple[str, int], str] = {}
    inserted: list[tuple[int, onnx.NodeProto]] = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            new = f"{name}{CAST_SUFFIX}{precision_of_type(to)}"
            inserted.append((producer_pos.get(name, -1), helper.make_node("Cast", [name], [new], name=new, to=to)))
            casts[(name, to)] = new
        return casts[(name, to)]

    for k, n in enumerate(nodes):
        if n.op_type == "Cast" or n.op_type in SHAPE_OPS:
            continue  # any input type
        for j, i in enumerate(n.input):
            if i and new_type.get(i) in (TensorProto.FLOAT, low) and new_type[i] != wants(k, j):
                n.input[j] = cast(i, wants(k, j))
    for o in g.output:  # the graph output stays FP32
        if new_type.get(o.name) == low:
            k = producer_pos[o.name]
            inner = o.name + CAST_SUFFIX + precision
            nodes[k].output[list(nodes[k].output).index(o.name)] = inner
            for c in ix.consumers.get(o.name, []):
                c.input[list(c.input).index(o.name)] = inner
            inserted.append((k, helper.make_node("Cast", [inner], [o.name], name=o.name + CAST_SUFFIX + "fp32",
                                                 to=TensorProto.FLOAT)))
    info.casts = len(inserted)
    after: dict[int, list[onnx.NodeProto]] = {}
    for a, c in inserted:
        after.setdefault(a, []).append(c)
    order = list(after.get(-1, []))
    for k, n in enumerate(nodes):
        order.append(n)
        order.extend(after.get(k, []))
    del g.node[:]
    g.node.extend(order)
    info.low_nodes = sum(1 for k in range(len(nodes)) if place[k] and is_dyn[k])
    info.requantized_channels = _weight_scales_to_normal(out, precision)
    del g.value_info[:]
    onnx.shape_inference.infer_shapes(_without_weight_bytes(out), check_type=True, strict_mode=True)  # the types are consistent
    return out, info


LIGHT_MIN_BYTES = 4096  # float / 8-bit initializers from this size on are weights: no reader's shape depends on them


def _copy_fields(dst, src, skip: str) -> None:
    """Copy every set field of protobuf message `src` into `dst` except `skip`."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if (fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED):  # protobuf < 5
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _without_weight_bytes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for shape inference whose large float and 8-bit initializers carry no bytes
    (marked external, as in a graph loaded without its weights file): inference needs their types and
    dims only, and would otherwise copy the weights several times (serialized in, out and parsed back)."""
    light = onnx.ModelProto()
    _copy_fields(light, model, skip="graph")
    _copy_fields(light.graph, model.graph, skip="initializer")
    weights = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8, TensorProto.UINT8,
               TensorProto.INT4, TensorProto.UINT4)
    for t in model.graph.initializer:
        if t.data_type in weights and t.ByteSize() >= LIGHT_MIN_BYTES:
            light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                        data_location=TensorProto.EXTERNAL)
        else:
            light.graph.initializer.add().CopyFrom(t)
    return light


def _weight_scales_to_normal(model: onnx.ModelProto, precision: str) -> int:
    """Weight channels whose scale is below the smallest normal number of `precision`: the scale
    becomes that number and the integers are requantized (q' = round(q * s / s')). Returns how many."""
    t_min = tiny(precision)
    ix = P.GraphIndex(model)
    fixed = 0
    for pair in P.qdq_pairs(model, ix):
        if not pair.is_weight:
            continue
        dq = pair.dq
        s_t, q_t = ix.inits.get(dq.input[1]), ix.inits.get(dq.input[0])
        if s_t is None or q_t is None:
            continue
        s = numpy_helper.to_array(s_t).astype(np.float64)
        bad = ~(np.abs(s) >= t_min)
        if not bad.any():
            continue
        q = numpy_helper.to_array(q_t)
        qf = q.astype(np.float64)
        axis = int(P.attr(dq, "axis", 1)) if s.ndim else 0
        shape = [1] * q.ndim
        if s.ndim:
            shape[axis] = -1
        s_full = s.reshape(shape) if s.ndim else s
        new_s = np.where(bad, t_min, s)
        info = np.iinfo(q.dtype) if q.dtype.kind in "iu" else None
        lo, hi = (info.min, info.max) if info else (-128, 127)
        new_q = np.clip(np.round(qf * s_full / (new_s.reshape(shape) if s.ndim else new_s)), lo, hi).astype(q.dtype)
        q_t.CopyFrom(numpy_helper.from_array(np.where(bad.reshape(shape) if s.ndim else bad, new_q, q), q_t.name))
        s_t.CopyFrom(numpy_helper.from_array(to_precision(new_s, precision), s_t.name))
        fixed += int(bad.sum())
    return fixed


__all__ = [
    "Conversion",
    "DEFAULT_TRT",
    "ELEM_TYPE",
    "KEEP_FP32_OPS",
    "PRECISIONS",
    "normal_scale",
    "convert",
    "fp32_islands",
    "parse_high_precision",
    "precision_violations",
    "precision_of_type",
    "stream_inputs",
    "tiny",
]
