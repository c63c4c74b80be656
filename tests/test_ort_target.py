"""The onnxruntime CPU target: output Q/DQ on every quantized Conv/MatMul/Gemm, uint8 128 zero
points, onnxruntime fuses >= 95% of the quantized ops; what int8 zero points would leave unfused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper as nh

from adpdm_export import qdq_graph_passes as P
from adpdm_export.ort_target import (
    MIN_FUSED_RATIO,
    add_output_qdq,
    fusion_counts,
    make_ort_target,
    quantized_ops,
    set_zero_point_uint8,
)
from adpdm_export.qdq_export import WEIGHTS_NAME, export_qdq
from engines.errors import AdpdmError
from qdq_fixtures import U2C, U2D, quick_result
from tiny_models import tiny_cond_unet, tiny_unet2d


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    unet = tiny_unet2d()
    result = quick_result(unet, **U2D)
    # the TensorRT target in FP32, the type of the CPU target it is compared with (the design's measurement)
    exp = export_qdq(unet, result, tmp_path_factory.mktemp("ortp"), target="both", check=False,
                     high_precision="fp32", **U2D)
    return result, exp


def test_output_qdq_on_every_quantized_op_with_calibrated_scales(exported):
    result, exp = exported
    m = onnx.load(str(exp.graphs["ort"][1]), load_external_data=False)
    ix = P.GraphIndex(m)
    ops = quantized_ops(m, ix)
    assert ops and {o.op_type for o in ops} == {"Conv", "MatMul"}
    for op in ops:
        (q,) = ix.consumers[op.output]  # the layer output feeds only its output quantizer
        assert q.op_type == "QuantizeLinear" and q.input[1] == f"{op.layer}.output_quantizer.scale"
        s = nh.to_array(ix.inits[q.input[1]])
        assert np.float32(s) == np.float32(result.activation_scales[f"{op.layer}.output_quantizer"][1])
        if op.op_type == "MatMul":  # after the Linear's bias Add, where the wrapper quantizes
            assert ix.producer[op.output].op_type == "Add"


def test_zero_points(exported):
    _, exp = exported
    m = onnx.load(str(exp.graphs["ort"][0]))  # weight zero points live in the weights file
    ix = P.GraphIndex(m)
    for p in P.qdq_pairs(m, ix):
        zp = ix.inits.get(p.dq.input[2])
        if p.is_weight:  # weights stay symmetric int8 (onnxruntime's U8S8 kernels)
            assert zp.data_type == TensorProto.INT8 and not nh.to_array(zp).any()
        else:  # activations: uint8 128, the same grid as int8 0
            v = nh.to_array(ix.inits[p.q.input[2]])
            assert v.dtype == np.uint8 and int(v) == 128


def test_ort_graphs_share_the_trt_weights_file(exported):
    _, exp = exported
    for f in exp.graphs["ort"]:
        m = onnx.load(str(f), load_external_data=False)
        assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == {WEIGHTS_NAME}
    # the group graphs' one weights file, and the tensors onnxruntime rewrote for the one-session graph (issue 16)
    assert sorted(p.name for p in exp.out_dir.glob("*.data")) == sorted([WEIGHTS_NAME, "unet.shared.ort.data"])


def test_fusion_at_least_95_percent(exported):
    _, exp = exported
    fc = fusion_counts(exp.graphs["ort"][0])
    assert fc.total == sum(fc.quantized.values()) == 39  # 23 Conv + 16 attention projections
    assert fc.ratio >= MIN_FUSED_RATIO, fc.summary()
    assert fc.fused.get("QLinearConv") == fc.quantized["Conv"]
    assert fc.unfused == []
    assert exp.fusion["ort"]["ratio"] >= MIN_FUSED_RATIO  # recorded by the export


def test_what_the_trt_target_and_int8_zero_points_leave_unfused(exported):
    """docs/design.md's measurement, reproduced: without output Q/DQ no QLinearConv; with output Q/DQ
    but int8 zero points, ops whose input has several consumers (q/k/v) stay unfused."""
    _, exp = exported
    trt = fusion_counts(exp.graphs["trt"][0])
    assert trt.fused.get("QLinearConv", 0) == 0 and trt.ratio < 0.5
    m = onnx.load(str(exp.graphs["trt"][0]), load_external_data=False)
    scales = {}

    def scale_of(q):
        return scales.setdefault(q, 0.05)

    add_output_qdq(m, scale_of)  # int8 zero points kept
    int8_path = exp.graphs["trt"][0].with_name(".int8-out.onnx")
    int8_path.write_bytes(m.SerializeToString())
    try:
        int8 = fusion_counts(int8_path)
    finally:
        int8_path.unlink()
    ort = fusion_counts(exp.graphs["ort"][0])
    assert int8.fused_total < ort.fused_total
    assert any("/to_k/" in n or "/to_v/" in n for n in int8.unfused), int8.unfused


def _tiny_trt_template():
    """x -> Q/DQ -> MatMul(DQ(W) via Transpose) -> Add(bias) -> Relu, and a Conv, as traced."""
    rs = np.random.RandomState(0)
    inits = [
        nh.from_array(np.float32(0.05), "lin.input_quantizer.scale"),
        nh.from_array(np.int8(0), P.ACT_ZERO_POINT),
        nh.from_array(rs.randint(-127, 127, (6, 4)).astype(np.int8), "unet.lin.weight"),
        nh.from_array(np.full(6, 0.01, np.float32), "lin.weight_quantizer.scale"),
        nh.from_array(np.zeros(6, np.int8), "lin.weight_quantizer.zero_point"),
        nh.from_array(rs.randn(6).astype(np.float32), "unet.lin.bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "lin.input_quantizer.scale", P.ACT_ZERO_POINT], ["xq"], name="/unet/lin/input_quantizer/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "lin.input_quantizer.scale", P.ACT_ZERO_POINT], ["xd"], name="/unet/lin/input_quantizer/DequantizeLinear"),
        helper.make_node("DequantizeLinear", ["unet.lin.weight", "lin.weight_quantizer.scale", "lin.weight_quantizer.zero_point"], ["wd"], name="/unet/lin/weight_quantizer/DequantizeLinear", axis=0),
        helper.make_node("Transpose", ["wd"], ["wt"], name="/unet/lin/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["xd", "wt"], ["mm"], name="/unet/lin/MatMul"),
        helper.make_node("Add", ["unet.lin.bias", "mm"], ["lin_out"], name="/unet/lin/Add"),
        helper.make_node("Relu", ["lin_out"], ["y"], name="/unet/Relu"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


def test_make_ort_target_on_a_small_graph():
    trt = _tiny_trt_template()
    ort, names = make_ort_target(trt, lambda q: 0.2)
    assert names == ["lin.output_quantizer"]
    assert len(trt.graph.node) == 7  # the template is not modified
    ix = P.GraphIndex(ort)
    relu = next(n for n in ort.graph.node if n.name == "/unet/Relu")
    dq = ix.producer[relu.input[0]]
    q = ix.producer[dq.input[0]]
    assert (dq.op_type, q.op_type, q.input[0]) == ("DequantizeLinear", "QuantizeLinear", "lin_out")
    assert nh.to_array(ix.inits[P.ACT_ZERO_POINT]).dtype == np.uint8
    onnx.checker.check_model(ort)
    # numerics: same grid, so uint8 128 and int8 0 give the same values
    import onnxruntime as rt

    x = np.random.RandomState(1).randn(2, 3, 4).astype(np.float32)
    so = rt.SessionOptions()
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    int8 = _tiny_trt_template()
    add_output_qdq(int8, lambda q: 0.2)
    a = rt.InferenceSession(ort.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = rt.InferenceSession(int8.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)


def test_output_qdq_refuses_bad_scales_and_double_application():
    with pytest.raises(AdpdmError, match="must be finite and > 0"):
        add_output_qdq(_tiny_trt_template(), lambda q: 0.0)
    ort, _ = make_ort_target(_tiny_trt_template(), lambda q: 0.2)
    with pytest.raises(AdpdmError, match="already"):
        add_output_qdq(ort, lambda q: 0.2)
    m = _tiny_trt_template()
    set_zero_point_uint8(m)
    set_zero_point_uint8(m)  # idempotent
    assert int(nh.to_array(next(t for t in m.graph.initializer if t.name == P.ACT_ZERO_POINT))) == 128


@pytest.mark.slow
def test_fusion_cond_unet(tmp_path):
    unet = tiny_cond_unet()
    exp = export_qdq(unet, quick_result(unet, **U2C), tmp_path, target="ort", check=False, **U2C)
    fc = fusion_counts(exp.graphs["ort"][0])
    assert fc.ratio >= MIN_FUSED_RATIO, fc.summary()
