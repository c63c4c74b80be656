"""The TensorRT-rule linter: a clean QDQ graph passes; each rule has a graph that breaks it,
and the message names the node (or initializer) at fault."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper as nh

from adpdm_export.qdq_lint import RULES, lint_model

C, K = 4, 8
Q_IN = "/unet/block/conv/input_quantizer/QuantizeLinear"
DQ_IN = "/unet/block/conv/input_quantizer/DequantizeLinear"
DQ_W = "/unet/block/conv/weight_quantizer/DequantizeLinear"
CONV = "/unet/block/conv/Conv"


def build(
    opset=19,
    act_zp=np.int8(0),
    act_scale=np.float32(0.05),
    w_axis=0,
    w_zp_dtype=np.int8,
    q_feeds=None,
    after_conv=None,
    scale_from_input=False,
    w_scale_dtype=np.float32,
):
    """x -> Q -> DQ -> Conv(W via per-channel DQ) -> Relu -> y, with knobs that break one rule each."""
    rs = np.random.RandomState(0)
    w = rs.randint(-127, 128, size=(K, C, 3, 3)).astype(np.int8)
    inits = [
        nh.from_array(w, "unet.block.conv.weight"),
        nh.from_array((rs.rand(K).astype(np.float32) + 0.5).astype(w_scale_dtype) / 100, "block.conv.weight_quantizer.scale"),
        nh.from_array(np.zeros(K, w_zp_dtype), "block.conv.weight_quantizer.zero_point"),
        nh.from_array(rs.randn(K).astype(np.float32), "unet.block.conv.bias"),
    ]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", C, 8, 8])]
    if scale_from_input:
        inputs.append(helper.make_tensor_value_info("act_scale", TensorProto.FLOAT, []))
        scale_name = "act_scale"
    else:
        inits.append(nh.from_array(np.asarray(act_scale), "block.conv.input_quantizer.scale"))
        scale_name = "block.conv.input_quantizer.scale"
    zp_inputs = [scale_name]
    if act_zp is not None:
        inits.append(nh.from_array(np.asarray(act_zp), "qdq.act.zero_point"))
        zp_inputs.append("qdq.act.zero_point")
    nodes = [
        helper.make_node("QuantizeLinear", ["sample", *zp_inputs], ["xq"], name=Q_IN),
        helper.make_node("DequantizeLinear", ["xq", *zp_inputs], ["xd"], name=DQ_IN),
        helper.make_node(
            "DequantizeLinear",
            ["unet.block.conv.weight", "block.conv.weight_quantizer.scale", "block.conv.weight_quantizer.zero_point"],
            ["wd"],
            name=DQ_W,
            **({} if w_axis is None else {"axis": w_axis}),
        ),
        helper.make_node("Conv", ["xd", "wd", "unet.block.conv.bias"], ["c"], name=CONV, pads=[1, 1, 1, 1]),
    ]
    if q_feeds == "relu":  # a Q whose output feeds a non-DQ node
        nodes[1] = helper.make_node("Relu", ["xq"], ["xd"], name="/unet/block/Relu_bad")
    out = "c"
    if after_conv == "qdq":  # an output Q/DQ on the Conv (the onnxruntime target's pattern)
        inits.append(nh.from_array(np.float32(0.1), "block.conv.output_quantizer.scale"))
        nodes += [
            helper.make_node("QuantizeLinear", ["c", "block.conv.output_quantizer.scale", "qdq.act.zero_point"], ["cq"],
                             name="/unet/block/conv/output_quantizer/QuantizeLinear"),
            helper.make_node("DequantizeLinear", ["cq", "block.conv.output_quantizer.scale", "qdq.act.zero_point"], ["cd"],
                             name="/unet/block/conv/output_quantizer/DequantizeLinear"),
        ]
        out = "cd"
    nodes.append(helper.make_node("Relu", [out], ["y"], name="/unet/block/Relu"))
    graph = helper.make_graph(nodes, "qdq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", K, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def rules_of(violations):
    return {v.rule for v in violations}


def test_clean_graph_passes():
    m = build()
    onnx.checker.check_model(m)
    assert lint_model(m) == []


def test_every_rule_is_tested_below():
    tested = {"opset", "zero-point", "scale", "scale-dtype", "per-channel-weights", "per-channel-axis",
              "activation-per-tensor", "qdq-pairing", "weighted-output", "external-data",
              "high-precision"}  # tests/test_high_precision.py
    assert tested == set(RULES)


@pytest.mark.parametrize(
    "kwargs, rule, node",
    [
        ({"opset": 17}, "opset", "qdq"),
        ({"act_zp": np.uint8(128)}, "zero-point", Q_IN),  # asymmetric uint8 (the onnxruntime target)
        ({"act_zp": np.int8(3)}, "zero-point", Q_IN),
        ({"act_zp": None}, "zero-point", Q_IN),  # missing zero point: uint8 output
        ({"w_zp_dtype": np.uint8}, "zero-point", DQ_W),
        ({"act_scale": np.float32(0.0)}, "scale", Q_IN),
        ({"act_scale": np.float32(-0.1)}, "scale", DQ_IN),
        ({"act_scale": np.float32(np.inf)}, "scale", Q_IN),
        ({"scale_from_input": True}, "scale", Q_IN),  # not a constant
        ({"act_scale": np.float16(0.05)}, "scale-dtype", Q_IN),  # fp16 scale on an fp32 tensor
        ({"w_scale_dtype": np.float16}, "scale-dtype", DQ_W),  # DQ would output fp16 into an fp32 Conv
        ({"act_scale": np.full(C, 0.05, np.float32)}, "per-channel-weights", Q_IN),
        ({"w_axis": 1}, "per-channel-axis", DQ_W),
        ({"w_axis": None}, "per-channel-axis", DQ_W),  # ONNX's default axis is 1
        ({"act_scale": np.array([0.05], np.float32)}, "activation-per-tensor", Q_IN),
        ({"q_feeds": "relu"}, "qdq-pairing", Q_IN),
        ({"after_conv": "qdq"}, "weighted-output", "/unet/block/conv/output_quantizer/QuantizeLinear"),
    ],
)
def test_each_rule_names_the_node(kwargs, rule, node):
    v = [x for x in lint_model(build(**kwargs)) if x.rule == rule]
    assert v, f"{rule} not reported for {kwargs}: {lint_model(build(**kwargs))}"
    assert any(x.node == node and str(x).startswith(node) for x in v), [str(x) for x in v]


def test_weighted_output_names_the_weighted_op():
    v = [x for x in lint_model(build(after_conv="qdq")) if x.rule == "weighted-output"]
    assert CONV in v[0].message


def test_input_quantization_of_the_next_conv_is_not_a_weighted_output():
    """conv1 -> Q/DQ -> conv2 is conv2's input quantization (TensorRT fuses it): allowed."""
    m = build(after_conv="qdq")
    relu = m.graph.node[-1]
    m.graph.node.remove(relu)
    m.graph.initializer.extend([nh.from_array(np.zeros((K, K, 1, 1), np.float32), "w2")])
    m.graph.node.append(helper.make_node("Conv", ["cd", "w2"], ["y"], name="/unet/next/Conv"))
    assert "weighted-output" not in rules_of(lint_model(m))


def _save_external(m, folder, location, offset=0, truncate=False):
    """Save `m` with the weight stored at `location` (relative to folder), possibly hostile."""
    w = next(t for t in m.graph.initializer if t.name == "unet.block.conv.weight")
    raw = w.raw_data
    target = (folder / location)
    if ".." not in location and not location.startswith("/"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\0" * offset + (raw[: len(raw) // 2] if truncate else raw))
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        e = w.external_data.add()
        e.key, e.value = k, v
    path = folder / "g.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def test_external_data_inside_the_folder_passes(tmp_path):
    path = _save_external(build(), tmp_path, "unet.weights.data", offset=64)
    assert lint_model(path) == []


@pytest.mark.parametrize(
    "location, truncate, words",
    [
        ("../outside.data", False, "leaves the graph's folder"),
        ("/etc/passwd", False, "absolute path"),
        ("missing.data", None, "does not exist"),
        ("unet.weights.data", True, "runs past the end"),
    ],
)
def test_external_data_rule(tmp_path, location, truncate, words):
    folder = tmp_path / "build"
    folder.mkdir()
    m = build()
    if truncate is None:  # a file that is never written
        w = next(t for t in m.graph.initializer if t.name == "unet.block.conv.weight")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        e = w.external_data.add()
        e.key, e.value = "location", location
        path = folder / "g.onnx"
        path.write_bytes(m.SerializeToString())
    else:
        path = _save_external(m, folder, location, truncate=truncate)
    v = [x for x in lint_model(path) if x.rule == "external-data"]
    assert v and v[0].node == "unet.block.conv.weight" and words in v[0].message, [str(x) for x in lint_model(path)]


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    outside = tmp_path / "secret.data"
    m = build()
    raw = next(t for t in m.graph.initializer if t.name == "unet.block.conv.weight").raw_data
    outside.write_bytes(raw)
    (folder / "link.data").symlink_to(outside)
    path = _save_external(m, folder, "link.data")
    assert "external-data" in rules_of(lint_model(path))
