"""Graph passes that turn a traced fake-quant UNet into the QDQ graphs TensorRT and onnxruntime run.

The TorchScript exporter turns every `torch.fake_quantize_*` call into a
QuantizeLinear -> DequantizeLinear pair, named by module scope
(`/unet/<module path>/<quantizer>/QuantizeLinear`). These passes, on an in-memory
`onnx.ModelProto`:

* `constants_to_initializers`: Q/DQ scales and zero points given by `Constant` nodes
  become initializers (static scales, as TensorRT wants them).
* `fold_weight_quantizers`: a QuantizeLinear of a constant weight is folded into an
  integer initializer (INT8, or INT4 for W4A8) feeding the per-channel DequantizeLinear
  (axis 0 of the stored weight = output channel). A Linear traced as
  `DQ(W[out, in]) -> Transpose -> MatMul` keeps its Transpose: the stored weight stays
  [out, in] with its scales on axis 0, the layout TensorRT's per-channel rule asks for.
* `name_activation_qdq`: every activation Q/DQ gets a stable scale initializer
  `{quantizer}.scale` (the quantizer's module path in the UNet) and the shared zero point
  `qdq.act.zero_point`.
* `dedupe_activation_qdq`: identical Q/DQ pairs on the same tensor (q/k/v projections
  sharing one input quantizer) become one pair feeding all the consumers.
* `set_activation_scales`, `graph_signature`, `assert_identical_but_scales`: per-group
  graphs are the one template with only the activation-scale values replaced, and that is
  checked in code.
* `SharedWeights` / `externalize`: every initializer but the activation Q/DQ parameters is
  stored once, content-addressed, in ONE external data file shared by all group graphs (and
  by the onnxruntime-target graphs where their tensors are the same bytes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from engines.errors import AdpdmError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ACT_ZERO_POINT = "qdq.act.zero_point"
SCALE_SUFFIX = ".scale"
EXPORT_ROOT = "unet"  # the export wrapper's attribute holding the UNet (onnx_export.UNetForExport)
WEIGHTS_ALIGN = 64
WEIGHTS_NAME = "unet.weights.data"  # the one external weights file of a QDQ export
REPORT_NAME = "qdq_report.json"  # the export's checks (parity, lint, fusion), listed in the manifest


# --------------------------------------------------------------------------- graph index


def read_tensor(t: TensorProto, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The value of `t`; one stored outside the message is read from `base_dir` without being
    loaded into it (the message stays as small as it was)."""
    if not external_data_helper.uses_external_data(t):
        return numpy_helper.to_array(t)
    if base_dir is None:
        raise AdpdmError(f"initializer {t.name} is stored outside the graph and no folder was given to read it from")
    copy = TensorProto()
    copy.CopyFrom(t)  # metadata only: the bytes are in the file
    external_data_helper.load_external_data_for_tensor(copy, str(base_dir))
    copy.data_location = TensorProto.DEFAULT
    del copy.external_data[:]
    return numpy_helper.to_array(copy)


def load_external_tensors(model: onnx.ModelProto, base_dir: str | os.PathLike) -> int:
    """Read every tensor of `model` still stored outside it (initializers and Constant nodes) into it;
    the loaded tensors serialize exactly as tensors that were never outside (no `data_location`)."""
    n = 0
    g = model.graph
    tensors = list(g.initializer) + [a.t for node in g.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if external_data_helper.uses_external_data(t):
            external_data_helper.load_external_data_for_tensor(t, str(base_dir))
            t.ClearField("data_location")  # (older onnx leaves both set; newer sets DEFAULT explicitly)
            del t.external_data[:]
            n += 1
    return n


class GraphIndex:
    """Producers, consumers and initializers of one graph (rebuild after edits)."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike | None = None):
        g = model.graph
        self.model = model
        self.base_dir = base_dir  # where initializers stored outside the message are read from
        self.inits: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output (None if not constant)."""
        if name in self.inits:
            return read_tensor(self.inits[name], self.base_dir)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return read_tensor(a.t, self.base_dir)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
                if a.name == "value_int":
                    return np.array(a.i, np.int64)
        return None

    def const_dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return a.t.data_type
        return None

    def is_const(self, name: str) -> bool:
        if name in self.inits:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def remove_nodes(model: onnx.ModelProto, dead: Iterable[onnx.NodeProto]) -> None:
    dead_ids = {id(n) for n in dead}
    keep = [n for n in model.graph.node if id(n) not in dead_ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def prune_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers (and Constant nodes) no node or graph output uses."""
    removed = 0
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead_consts = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]
        if not dead_consts:
            break
        remove_nodes(model, dead_consts)
        removed += len(dead_consts)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    # deleted in place: re-adding the kept ones would copy every weight into protobuf's arena again
    dead = [i for i, t in enumerate(model.graph.initializer) if t.name not in used]
    for i in reversed(dead):
        del model.graph.initializer[i]
    return removed + len(dead)


def opset_version(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = int(version)
            return
    model.opset_import.append(helper.make_opsetid("", int(version)))


# --------------------------------------------------------------------------- Q/DQ pairs


@dataclass
class QdqPair:
    q: onnx.NodeProto | None
    dq: onnx.NodeProto
    source: str  # the quantized tensor (Q's input; for a folded weight, DQ's integer input)
    is_weight: bool


def qdq_pairs(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[QdqPair]:
    """Every DequantizeLinear with its QuantizeLinear (if any), in graph order."""
    ix = index or GraphIndex(model)
    pairs = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = ix.producer.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            src = q.input[0]
            pairs.append(QdqPair(q, n, src, ix.is_const(src)))
        else:
            pairs.append(QdqPair(None, n, n.input[0], ix.is_const(n.input[0])))
    return pairs


def scope_of(node_name: str) -> list[str]:
    """Module-scope parts of a TorchScript-exported node name, without the op part.

    `/unet/down_blocks.0/resnets.0/conv1/input_quantizer/QuantizeLinear` ->
    ['unet', 'down_blocks.0', 'resnets.0', 'conv1', 'input_quantizer'].
    """
    parts = [p for p in node_name.split("/") if p]
    return parts[:-1]


def module_path_of(node_name: str, root: str = EXPORT_ROOT) -> str:
    """The UNet module path of a node (`down_blocks.0.resnets.0.conv1.input_quantizer`)."""
    parts = scope_of(node_name)
    if parts and parts[0] == root:
        parts = parts[1:]
    return ".".join(parts)


def resolve_quantizer(node_name: str, known: Iterable[str], root: str = EXPORT_ROOT) -> str | None:
    """The longest known quantizer path that is a prefix (by module) of the node's scope."""
    path = module_path_of(node_name, root)
    known = set(known)
    parts = path.split(".") if path else []
    # Module names contain dots ("down_blocks.0"): try every prefix length.
    for end in range(len(parts), 0, -1):
        cand = ".".join(parts[:end])
        if cand in known:
            return cand
    return None


# --------------------------------------------------------------------------- passes


def constants_to_initializers(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> int:
    """Turn Constant nodes that feed Q/DQ scale / zero-point inputs into initializers (values stored
    outside `model` are read from `base_dir`)."""
    ix = GraphIndex(model, base_dir)
    wanted: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        if n.op_type in QDQ_OPS:
            for name in list(n.input[1:3]):
                p = ix.producer.get(name)
                if p is not None and p.op_type == "Constant":
                    wanted[name] = p
    for name, node in wanted.items():
        value = ix.const_value(name)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    remove_nodes(model, wanted.values())
    return len(wanted)


def _np_to_dtype(bits: int):
    if bits == 8:
        return np.int8, TensorProto.INT8
    if bits == 4:
        import ml_dtypes

        return ml_dtypes.int4, TensorProto.INT4
    raise AdpdmError(f"{bits}-bit weights cannot be stored in ONNX (INT8 or INT4 only)")


def quantize_weight(w: np.ndarray, scales: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Integer weights exactly as calibration.quantizers.fake_quant computes them.

    q = clamp(round_half_even(w * float32(1 / s)), qmin, qmax): the reciprocal is taken in
    float32 and multiplied (as torch.fake_quantize_* does), so q * s is bit for bit the
    simulated weight.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = np.asarray(scales, np.float32)
    if s.size > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    else:
        s = s.reshape(())
    inv = (np.float32(1.0) / s).astype(np.float32)
    q = np.rint(w.astype(np.float32) * inv)
    return np.clip(q, qmin, qmax).astype(np.int8)


@dataclass
class FoldedWeight:
    weight: str  # integer initializer name (the parameter's name in the export)
    scale: str  # per-channel scale initializer
    dq: str  # DequantizeLinear node name
    consumer: str  # the Conv/MatMul/Gemm node reading it (through a Transpose for MatMul)
    bits: int
    channels: int


def fold_weight_quantizers(
    model: onnx.ModelProto,
    bits_of: Callable[[str], int] | int = 8,
    name_scale: Callable[[onnx.NodeProto], str] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[FoldedWeight]:
    """Fold every QuantizeLinear of a constant weight into an integer initializer.

    `bits_of(q_node_name)` gives the weight bit width (8, or 4 for INT4 weights: the traced
    Q may have used an 8-bit range; the integers are recomputed here with the real width).
    The DQ keeps its per-channel float scale (renamed by `name_scale(dq)`), gets an integer
    zero point of zeros of the same shape, and axis 0. A weight whose scale is per-tensor
    keeps a scalar scale. Raises if a weight Q is per-channel on an axis other than 0.
    base_dir: where weights stored outside `model` are read from, one at a time: the FP32 weights
    never enter the message, only their integers do.
    """
    ix = GraphIndex(model, base_dir)
    folded: list[FoldedWeight] = []
    dead: list[onnx.NodeProto] = []
    taken = set(ix.inits)
    done: set[str] = set()

    def put(t: TensorProto) -> None:
        """Into the graph in place (the FP32 tensor's slot takes the integers): one copy in the message."""
        if t.name in ix.inits:
            ix.inits[t.name].CopyFrom(t)
        else:
            model.graph.initializer.append(t)
            ix.inits[t.name] = model.graph.initializer[-1]

    for pair in qdq_pairs(model, ix):
        if not pair.is_weight or pair.q is None:
            continue
        q, dq = pair.q, pair.dq
        if len(ix.consumers.get(q.output[0], [])) != 1:
            raise AdpdmError(f"weight QuantizeLinear {q.name} feeds more than one node")
        if q.input[0] in done:
            raise AdpdmError(f"weight {q.input[0]} is quantized by more than one QuantizeLinear ({q.name})")
        w = ix.const_value(q.input[0])
        scale = ix.const_value(q.input[1])
        if w is None or scale is None:
            raise AdpdmError(f"weight QuantizeLinear {q.name} has a non-constant input")
        scale = np.asarray(scale, np.float32)
        axis = int(attr(q, "axis", 1))
        if scale.ndim == 1 and scale.size > 1 and axis != 0:
            raise AdpdmError(f"{q.name}: per-channel weight quantization on axis {axis}; only axis 0 is supported")
        bits = bits_of(q.name) if callable(bits_of) else int(bits_of)
        np_dtype, onnx_dtype = _np_to_dtype(bits)
        qw = quantize_weight(w, scale, bits, 0)
        wname = q.input[0]
        scale_name = name_scale(dq) if name_scale else dq.input[1]
        zp_name = scale_name[: -len(SCALE_SUFFIX)] + ".zero_point" if scale_name.endswith(SCALE_SUFFIX) else scale_name + ".zero_point"
        for nm in (scale_name, zp_name):
            if nm in taken and nm not in (dq.input[1], q.input[1]):
                raise AdpdmError(f"initializer name clash while folding {q.name}: {nm}")
        put(numpy_helper.from_array(qw.astype(np_dtype), wname))
        del w, qw
        put(numpy_helper.from_array(scale, scale_name))
        put(numpy_helper.from_array(np.zeros(scale.shape, np_dtype), zp_name))
        taken.update((scale_name, zp_name))
        done.add(wname)
        del dq.input[:]
        dq.input.extend([wname, scale_name, zp_name])
        set_attr(dq, "axis", 0)
        dead.append(q)
        consumer = ix.consumers.get(dq.output[0], [None])[0]
        if consumer is not None and consumer.op_type == "Transpose":
            consumer = ix.consumers.get(consumer.output[0], [consumer])[0]
        folded.append(
            FoldedWeight(wname, scale_name, dq.name, consumer.name if consumer is not None else "", bits, int(scale.size))
        )
    remove_nodes(model, dead)
    prune_unused_initializers(model)
    return folded


@dataclass
class ActQdq:
    quantizer: str  # the quantizer's module path in the UNet
    scale: str  # scale initializer name
    q: str
    dq: str
    source: str  # the tensor quantized


def name_activation_qdq(
    model: onnx.ModelProto,
    quantizer_names: Iterable[str] | Mapping[str, str],
    zero_point_name: str = ACT_ZERO_POINT,
) -> list[ActQdq]:
    """Give every activation Q/DQ pair the scale `{quantizer}.scale` and one shared zero point.

    The quantizer of a pair is found from the Q node's module scope among
    `quantizer_names` (or the keys of a mapping module path -> canonical quantizer name, for
    quantizer modules registered under several paths). All activation zero points must be the same constant (0 of int8 in the
    TensorRT target); they become one scalar initializer `zero_point_name`. Raises on an
    activation Q/DQ whose quantizer cannot be found, whose Q and DQ disagree, or whose scale
    is not a constant scalar.
    """
    canon = dict(quantizer_names) if isinstance(quantizer_names, Mapping) else {n: n for n in quantizer_names}
    known = list(canon)
    ix = GraphIndex(model)
    pairs = [p for p in qdq_pairs(model, ix) if not p.is_weight]
    renames: dict[str, tuple[str, np.ndarray]] = {}
    zp_value: np.ndarray | None = None
    out: list[ActQdq] = []
    for p in pairs:
        if p.q is None:
            raise AdpdmError(f"activation DequantizeLinear {p.dq.name} has no QuantizeLinear before it")
        qn = resolve_quantizer(p.q.name, known)
        if qn is None:
            raise AdpdmError(f"cannot tell which quantizer made {p.q.name}")
        qn = canon[qn]
        s_q, s_dq = ix.const_value(p.q.input[1]), ix.const_value(p.dq.input[1])
        if s_q is None or s_dq is None:
            raise AdpdmError(f"{p.q.name}: activation scale is not a constant")
        if np.asarray(s_q).size != 1 or not np.array_equal(s_q, s_dq):
            raise AdpdmError(f"{p.q.name}: activation scale must be one scalar shared by Q and DQ")
        zq = ix.const_value(p.q.input[2]) if len(p.q.input) > 2 and p.q.input[2] else None
        zdq = ix.const_value(p.dq.input[2]) if len(p.dq.input) > 2 and p.dq.input[2] else None
        if zq is None or zdq is None or zq.dtype != zdq.dtype or not np.array_equal(zq, zdq) or zq.size != 1:
            raise AdpdmError(f"{p.q.name}: activation zero point must be one constant shared by Q and DQ")
        if zp_value is None:
            zp_value = np.asarray(zq).reshape(())
        elif zq.dtype != zp_value.dtype or zq.reshape(()) != zp_value:
            raise AdpdmError(f"{p.q.name}: activation zero points differ across the graph")
        scale_name = qn + SCALE_SUFFIX
        prev = renames.get(scale_name)
        value = np.asarray(s_q, np.float32).reshape(())
        if prev is not None and not np.array_equal(prev[1], value):
            raise AdpdmError(f"quantizer {qn} is traced with two different scales")
        renames[scale_name] = (scale_name, value)
        for node in (p.q, p.dq):
            node.input[1] = scale_name
            node.input[2] = zero_point_name
        out.append(ActQdq(qn, scale_name, p.q.name, p.dq.name, p.source))
    existing = {t.name for t in model.graph.initializer}
    clash = (set(renames) | {zero_point_name}) & existing
    if clash:
        raise AdpdmError(f"initializer names already taken: {sorted(clash)[:3]}")
    for name, (_, value) in renames.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    if zp_value is not None:
        model.graph.initializer.append(numpy_helper.from_array(zp_value, zero_point_name))
    prune_unused_initializers(model)
    return out


def dedupe_activation_qdq(model: onnx.ModelProto, key_of: Callable[[str], object] | None = None) -> int:
    """Merge activation Q/DQ pairs that quantize the same tensor identically.

    Two pairs merge when they read the same tensor, use the same zero point, and
    `key_of(scale_initializer_name)` is equal (default: the scale value). For per-group
    graphs pass a key that covers every group's scale, so the merge is the same in all of
    them. The first pair (graph order) is kept; the other's consumers read its output.
    Returns the number of pairs removed.
    """
    ix = GraphIndex(model)
    if key_of is None:
        def key_of(name: str):  # noqa: E306
            v = ix.const_value(name)
            return None if v is None else np.asarray(v).tobytes()
    kept: dict[tuple, QdqPair] = {}
    dead: list[onnx.NodeProto] = []
    rewire: dict[str, str] = {}
    for p in qdq_pairs(model, ix):
        if p.is_weight or p.q is None:
            continue
        if len(ix.consumers.get(p.q.output[0], [])) != 1 or p.dq.output[0] in ix.graph_outputs:
            continue
        k = (p.source, key_of(p.q.input[1]), p.q.input[2] if len(p.q.input) > 2 else "", attr(p.q, "axis", 1))
        if k[1] is None:
            continue
        first = kept.get(k)
        if first is None:
            kept[k] = p
            continue
        rewire[p.dq.output[0]] = first.dq.output[0]
        dead.extend([p.q, p.dq])
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in rewire:
                n.input[i] = rewire[name]
    remove_nodes(model, dead)
    prune_unused_initializers(model)
    return len(dead) // 2


def set_activation_scales(model: onnx.ModelProto, scales: Mapping[str, float]) -> onnx.ModelProto:
    """A copy of `model` with the named scalar scale initializers set to `scales`, each stored in the
    initializer's own float type (float32, or float16 / bfloat16 in a high-precision graph)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    want = dict(scales)
    for t in out.graph.initializer:
        if t.name in want:
            v = np.float32(want.pop(t.name))
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            stored = np.asarray(v, np.float32).astype(dtype)
            if not np.isfinite(v) or v <= 0 or not np.isfinite(np.float32(stored)) or np.float32(stored) <= 0:
                raise AdpdmError(f"scale {t.name} must be finite and > 0 in {np.dtype(dtype).name}, got {v}")
            t.CopyFrom(numpy_helper.from_array(stored, t.name))
    if want:
        raise AdpdmError(f"scales given for initializers the graph does not have: {sorted(want)[:3]}")
    return out


# --------------------------------------------------------------------------- identity check


def _tensor_digest(t: TensorProto, with_value: bool) -> tuple:
    head = (t.name, t.data_type, tuple(t.dims), t.data_location)
    if not with_value:
        return head
    if t.data_location == TensorProto.EXTERNAL:
        ext = tuple((e.key, e.value) for e in t.external_data)
        return head + (ext,)
    return head + (hashlib.sha256(t.SerializeToString()).hexdigest(),)


def graph_signature(model: onnx.ModelProto, scale_names: Iterable[str] = ()) -> dict:
    """What must be identical across group graphs: nodes (op, name, domain, inputs, outputs,
    attributes, in order), graph I/O, opsets, and initializers (name, dtype, shape, and value
    or external location) except the values of `scale_names`."""
    skip = set(scale_names)
    g = model.graph
    return {
        "opset": sorted((o.domain, o.version) for o in model.opset_import),
        "inputs": [i.SerializeToString() for i in g.input],
        "outputs": [o.SerializeToString() for o in g.output],
        "nodes": [n.SerializeToString(deterministic=True) for n in g.node],
        "initializers": [_tensor_digest(t, t.name not in skip) for t in g.initializer],
    }


def assert_identical_but_scales(models: Sequence[onnx.ModelProto], scale_names: Iterable[str], labels=None) -> None:
    """Raise unless every model equals the first in all but the values of `scale_names`."""
    scale_names = list(scale_names)
    labels = list(labels or [f"graph {i}" for i in range(len(models))])
    ref = graph_signature(models[0], scale_names)
    for m, label in zip(models[1:], labels[1:]):
        sig = graph_signature(m, scale_names)
        for key in ref:
            if sig[key] != ref[key]:
                detail = ""
                if key in ("nodes", "initializers"):
                    a, b = ref[key], sig[key]
                    if len(a) != len(b):
                        detail = f" ({len(a)} vs {len(b)} entries)"
                    else:
                        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                        what = models[0].graph.node[i].name if key == "nodes" else models[0].graph.initializer[i].name
                        detail = f" (first difference at {what!r})"
                raise AdpdmError(f"{label} differs from {labels[0]} in {key}{detail}: group graphs must differ only in activation scales")
    for t in models[0].graph.initializer:
        if t.name in set(scale_names) and t.data_location == TensorProto.EXTERNAL:
            raise AdpdmError(f"activation scale {t.name} must be stored inline, not in the shared weights file")


# --------------------------------------------------------------------------- external weights


class SharedWeights:
    """One external data file, content-addressed: identical tensors are stored once.

    Tensors are appended at WEIGHTS_ALIGN-byte offsets. Graphs written with `externalize`
    reference the file by its bare name, so it must sit next to them.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.location = self.path.name
        self._offsets: dict[str, tuple[int, int]] = {}
        self._size = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")

    def add(self, data: bytes) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest()
        hit = self._offsets.get(key)
        if hit is not None:
            return hit
        pad = (-self._size) % WEIGHTS_ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._size += pad
        off = self._size
        self._fh.write(data)
        self._size += len(data)
        self._offsets[key] = (off, len(data))
        return off, len(data)

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _raw_bytes(t: TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t), t.name).raw_data


def externalize(model: onnx.ModelProto, weights: SharedWeights, inline: Iterable[str]) -> None:
    """Move every initializer not named in `inline` to `weights` (in place)."""
    inline = set(inline)
    for t in model.graph.initializer:
        if t.name in inline or t.data_location == TensorProto.EXTERNAL:
            continue
        off, length = weights.add(_raw_bytes(t))
        dims, dtype, name = list(t.dims), t.data_type, t.name
        t.Clear()
        t.name, t.data_type = name, dtype
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", weights.location), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v


def save_graph(model: onnx.ModelProto, path: str | os.PathLike, check: bool = True) -> Path:
    """Write `model` (external tensors already referenced) and run the ONNX checker by path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(model.SerializeToString())
    os.replace(tmp, path)
    if check:
        onnx.checker.check_model(str(path), full_check=False)
    return path


__all__ = [
    "ACT_ZERO_POINT",
    "ActQdq",
    "FoldedWeight",
    "GraphIndex",
    "QdqPair",
    "SharedWeights",
    "assert_identical_but_scales",
    "constants_to_initializers",
    "dedupe_activation_qdq",
    "externalize",
    "fold_weight_quantizers",
    "graph_signature",
    "module_path_of",
    "name_activation_qdq",
    "opset_version",
    "prune_unused_initializers",
    "qdq_pairs",
    "quantize_weight",
    "resolve_quantizer",
    "save_graph",
    "set_activation_scales",
    "set_opset",
]
