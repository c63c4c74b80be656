"""A linter for the TensorRT explicit-quantization rules (docs/design.md, "Quantization contract").

`lint_model(path)` reads a QDQ ONNX graph (external data is read only for Q/DQ scales
and zero points, and only from inside the graph's folder) and returns one `Violation`
per broken rule and node. Rules:

  opset                 default-domain opset >= 19 (>= 21 when INT4 Q/DQ appear)
  zero-point            every Q/DQ has an explicit constant zero point, all zeros, of a
                        signed type TensorRT runs (int8, int4 for weights): symmetric
  scale                 every Q/DQ scale is a constant (initializer / Constant), finite, > 0
  scale-dtype           scale type is a float type TensorRT accepts and matches the tensor it
                        quantizes (Q) / the type its consumer computes in (DQ): in a strongly
                        typed network a DQ outputs its scale's type
  per-channel-weights   per-channel (non-scalar) scales only on constant weights
  per-channel-axis      per-channel weight Q/DQ on axis 0 only (ONNX's default axis is 1)
  activation-per-tensor activation Q/DQ use one scalar scale
  qdq-pairing           a QuantizeLinear feeds only DequantizeLinear nodes, and an activation
                        DequantizeLinear reads a QuantizeLinear
  weighted-output       no Q/DQ on the output of a weighted op (Conv, ConvTranspose, MatMul,
                        Gemm, or the bias Add of a MatMul), unless that Q/DQ only feeds
                        weighted ops (it is then their input quantization)
  external-data         external data locations are relative, inside the graph's folder,
                        exist, and hold the bytes the tensor claims
  high-precision        one float type outside the documented FP32 islands (the TensorRT target in
                        FP16/BF16, adpdm_export/high_precision.py): every non-island node's float
                        inputs and outputs, Q inputs, scales and DQ outputs in the graph's high
                        precision (`expect`, or the type most tensors have); graph I/O float32

`adpdm lint FILE.onnx...` runs it; the QDQ export runs it on every TensorRT-target graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adpdm_export.qdq_graph_passes import GraphIndex
from engines.errors import AdpdmError

MIN_OPSET = 19
MIN_OPSET_INT4 = 21
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
ZP_TYPES_ACT = (TensorProto.INT8,)
ZP_TYPES_WEIGHT = (TensorProto.INT8, TensorProto.INT4)
# Ops between a MatMul and its bias Add that keep it "the weighted op's output".
RULES = (
    "opset",
    "zero-point",
    "scale",
    "scale-dtype",
    "per-channel-weights",
    "per-channel-axis",
    "activation-per-tensor",
    "qdq-pairing",
    "weighted-output",
    "external-data",
    "high-precision",
)


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str  # the node (or initializer) at fault
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message} [{self.rule}]"


def _dtype_name(t: int) -> str:
    try:
        return TensorProto.DataType.Name(t).lower()
    except ValueError:
        return str(t)


class _Graph(GraphIndex):
    """The graph index plus the element types and folder the rules need."""

    def __init__(self, model: onnx.ModelProto, folder: Path | None):
        super().__init__(model)
        self.folder = folder
        g = model.graph
        self.types: dict[str, int] = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            self.types[t.name] = t.data_type
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
            for vi in inferred.graph.value_info:
                if vi.type.HasField("tensor_type") and vi.name not in self.types:
                    self.types[vi.name] = vi.type.tensor_type.elem_type
        except Exception:  # noqa: BLE001 - shape inference is best effort here
            pass
        self._bad_external: dict[str, str] = {}

    def node_label(self, n: onnx.NodeProto) -> str:
        return n.name or f"{n.op_type}({', '.join(n.output)})"

    def is_const(self, name: str) -> bool:
        if name in self.inits:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def const_dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return a.t.data_type
                if a.name in ("value_float", "value_floats"):
                    return TensorProto.FLOAT
        return None

    def const_value(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None:
            p = self.producer.get(name)
            if p is None or p.op_type != "Constant":
                return None
            for a in p.attribute:
                if a.name == "value":
                    t = a.t
                elif a.name == "value_float":
                    return np.array(a.f, np.float32)
                elif a.name == "value_floats":
                    return np.array(list(a.floats), np.float32)
            if t is None:
                return None
        if t.data_location == TensorProto.EXTERNAL:
            return self._external_value(t)
        return numpy_helper.to_array(t)

    def _external_value(self, t: TensorProto) -> np.ndarray | None:
        if self.folder is None:
            return None
        problem, path, off, length = external_data_problem(t, self.folder)
        if problem:
            return None
        with open(path, "rb") as fh:
            fh.seek(off)
            raw = fh.read(length)
        copy = TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = raw
        return numpy_helper.to_array(copy)


def external_data_problem(t: TensorProto, folder: Path) -> tuple[str | None, Path | None, int, int]:
    """Why an external tensor's data is unsafe or missing (None if fine), with path, offset, length."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not loc:
        return "has no external data location", None, 0, 0
    p = Path(loc)
    if p.is_absolute() or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        return f"external data location {loc!r} is an absolute path", None, 0, 0
    if any(part == ".." for part in p.parts) or "\\" in loc:
        return f"external data location {loc!r} leaves the graph's folder", None, 0, 0
    root = folder.resolve()
    full = (folder / p).resolve()
    if root != full and root not in full.parents:
        return f"external data location {loc!r} resolves outside the graph's folder", None, 0, 0
    if not full.is_file():
        return f"external data file {loc!r} does not exist next to the graph", None, 0, 0
    try:
        off = int(info.get("offset", "0"))
        size = full.stat().st_size
        length = int(info["length"]) if "length" in info else size - off
    except ValueError:
        return "external data offset/length are not integers", None, 0, 0
    if off < 0 or length < 0 or off + length > size:
        return f"external data [{off}, {off + length}) runs past the end of {loc!r} ({size} bytes)", None, 0, 0
    return None, full, off, length


def _weighted_source(g: _Graph, tensor: str) -> onnx.NodeProto | None:
    """The weighted op whose output `tensor` is (directly, or a MatMul through its bias Add)."""
    p = g.producer.get(tensor)
    if p is None:
        return None
    if p.op_type in WEIGHTED_OPS:
        return p
    if p.op_type == "Add" and len(p.input) == 2:
        for i in (0, 1):
            mm = g.producer.get(p.input[i])
            if mm is not None and mm.op_type in ("MatMul", "Gemm") and g.is_const(p.input[1 - i]):
                return mm
    return None


def lint_model(model: onnx.ModelProto | str | os.PathLike, folder: str | os.PathLike | None = None,
               high_precision: str | None = None) -> list[Violation]:
    """Check one QDQ graph against the TensorRT rules; [] when it passes. high_precision: the float type
    the graph must have outside its FP32 islands ("fp16", "bf16", "fp32"); None: the type most of its
    tensors have."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise AdpdmError(f"no ONNX file at {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise AdpdmError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
        folder = path.parent if folder is None else folder
    g = _Graph(model, Path(folder) if folder is not None else None)
    out: list[Violation] = []
    add = lambda rule, node, msg: out.append(Violation(rule, node, msg))  # noqa: E731

    # external data (every initializer, first: other rules read scales through it)
    if g.folder is not None:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                problem = external_data_problem(t, g.folder)[0]
                if problem:
                    add("external-data", t.name, problem)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    qdq = [n for n in model.graph.node if n.op_type in QDQ_OPS]
    int4 = any(
        len(n.input) > 2 and n.input[2] and g.const_dtype(n.input[2]) in (TensorProto.INT4, TensorProto.UINT4) for n in qdq
    )
    if opset < MIN_OPSET:
        add("opset", model.graph.name or "graph", f"opset {opset} is below {MIN_OPSET}")
    elif int4 and opset < MIN_OPSET_INT4:
        add("opset", model.graph.name or "graph", f"INT4 Q/DQ need opset >= {MIN_OPSET_INT4}, graph has {opset}")

    for n in qdq:
        label = g.node_label(n)
        is_q = n.op_type == "QuantizeLinear"
        data = n.input[0]
        weight = g.is_const(data)
        scale_name = n.input[1] if len(n.input) > 1 else ""
        zp_name = n.input[2] if len(n.input) > 2 else ""

        # scale: constant, finite, positive
        scale = g.const_value(scale_name) if scale_name else None
        if not scale_name or not g.is_const(scale_name):
            add("scale", label, f"scale {scale_name!r} is not a constant initializer")
        elif scale is None:
            add("scale", label, f"scale {scale_name!r} cannot be read")
        else:
            s = np.asarray(scale, np.float64)
            if not np.all(np.isfinite(s)) or not np.all(s > 0):
                bad = s[~(np.isfinite(s) & (s > 0))].ravel()[:3].tolist()
                add("scale", label, f"scale {scale_name!r} has non-positive or non-finite values {bad}")

        # scale dtype
        sdt = g.const_dtype(scale_name) if scale_name else None
        if sdt is not None and sdt not in FLOAT_TYPES:
            add("scale-dtype", label, f"scale {scale_name!r} is {_dtype_name(sdt)}, not a float type")
        elif sdt is not None:
            if is_q:
                xdt = g.types.get(data)
                if xdt is not None and xdt != sdt:
                    add("scale-dtype", label, f"scale is {_dtype_name(sdt)} but quantizes a {_dtype_name(xdt)} tensor")
            else:
                for c in g.consumers.get(n.output[0], []):
                    if c.op_type in QDQ_OPS + ("Transpose", "Reshape", "Identity"):
                        continue
                    others = [i for i in c.input if i and i != n.output[0]]
                    other_types = {g.types.get(i) for i in others} - {None}
                    other_types &= set(FLOAT_TYPES)
                    if other_types and sdt not in other_types:
                        add(
                            "scale-dtype",
                            label,
                            f"outputs {_dtype_name(sdt)} (its scale's type) into {g.node_label(c)}, which computes in "
                            f"{'/'.join(sorted(_dtype_name(t) for t in other_types))}",
                        )
                        break

        # zero point: explicit, constant, zero, signed type
        if not zp_name:
            add("zero-point", label, "has no zero point: ONNX then uses uint8, which TensorRT does not run")
        elif not g.is_const(zp_name):
            add("zero-point", label, f"zero point {zp_name!r} is not a constant")
        else:
            zdt = g.const_dtype(zp_name)
            allowed = ZP_TYPES_WEIGHT if weight else ZP_TYPES_ACT
            if zdt not in allowed:
                add(
                    "zero-point",
                    label,
                    f"zero point {zp_name!r} is {_dtype_name(zdt)}; TensorRT needs "
                    f"{' or '.join(_dtype_name(a) for a in allowed)} for {'weights' if weight else 'activations'}",
                )
            zp = g.const_value(zp_name)
            if zp is not None and np.any(np.asarray(zp).astype(np.int64) != 0):
                add("zero-point", label, f"zero point {zp_name!r} is not 0 (asymmetric quantization)")

        # per-channel / per-tensor
        if scale is not None:
            shape = tuple(np.asarray(scale).shape)
        elif scale_name in g.inits:
            shape = tuple(g.inits[scale_name].dims)
        else:
            shape = ()
        size = int(np.prod(shape)) if shape else 1
        if size > 1 and not weight:
            add("per-channel-weights", label, f"{size} scales on activation {data!r}: per-channel scales are for constant weights only")
        elif not weight and shape:
            add("activation-per-tensor", label, f"activation scale {scale_name!r} has shape {list(shape)}; use a scalar (rank 0)")
        elif size > 1:
            axis = None
            for a in n.attribute:
                if a.name == "axis":
                    axis = helper.get_attribute_value(a)
            if axis is None:
                add("per-channel-axis", label, "per-channel weight scales without an axis (ONNX default axis 1); use axis 0")
            elif axis != 0:
                add("per-channel-axis", label, f"per-channel weight scales on axis {axis}; TensorRT rule here: axis 0 only")

        # pairing
        if is_q:
            for c in g.consumers.get(n.output[0], []):
                if c.op_type != "DequantizeLinear":
                    add("qdq-pairing", label, f"feeds {c.op_type} {g.node_label(c)}, not a DequantizeLinear")
                    break
        elif not weight:
            p = g.producer.get(data)
            if p is None or p.op_type != "QuantizeLinear":
                add("qdq-pairing", label, f"dequantizes {data!r}, which no QuantizeLinear produced")

        # weighted outputs
        if is_q and not weight:
            src = _weighted_source(g, data)
            # A Q/DQ that only feeds weighted ops is their *input* quantization (e.g. a
            # downsampler's output read by the next block's 1x1 shortcut conv): allowed.
            readers = [c for d in g.consumers.get(n.output[0], []) for c in g.consumers.get(d.output[0], [])]
            if src is not None and not (readers and all(c.op_type in WEIGHTED_OPS for c in readers)):
                add(
                    "weighted-output",
                    label,
                    f"quantizes the output of weighted op {g.node_label(src)}; Q/DQ go on the inputs of Conv/MatMul/Gemm only",
                )

    from adpdm_export.high_precision import precision_violations

    for node, msg in precision_violations(model, g.types, high_precision):
        add("high-precision", node, msg)
    return out


def lint_files(paths: Sequence[str | os.PathLike]) -> dict[str, list[Violation]]:
    """Lint each file; {path: violations}."""
    return {str(p): lint_model(p) for p in paths}


def raise_on_violations(violations: Iterable[Violation], what: str) -> None:
    v = list(violations)
    if v:
        lines = "\n  ".join(str(x) for x in v[:20])
        more = f"\n  ... and {len(v) - 20} more" if len(v) > 20 else ""
        raise AdpdmError(f"{what} breaks {len(v)} TensorRT rule(s):\n  {lines}{more}")


__all__ = ["RULES", "Violation", "external_data_problem", "lint_files", "lint_model", "raise_on_violations"]
