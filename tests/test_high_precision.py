"""The TensorRT target in FP16 / BF16 outside the INT8 layers (issue 15, adpdm_export/high_precision.py):
the types of the converted graphs, the FP32 islands, the linter's high-precision rule on graphs that
break it, parity against the wrapper in FP16 (and a wrong graph caught), the flag's refusals, the
manifest record. The reference model: tests/test_qdq_export.py::test_reference_model_both_targets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adpdm_export import high_precision as HP
from adpdm_export.qdq_export import export_qdq
from adpdm_export.qdq_lint import lint_model
from engines.errors import AdpdmError
from qdq_fixtures import U2C, U2D, quick_result
from tiny_models import tiny_cond_unet, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")

F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def u2c_fp16(tmp_path_factory, one_thread):
    """The cross-attention UNet, TensorRT target, default precision (FP16), parity checked."""
    unet = tiny_cond_unet()
    result = quick_result(unet, **U2C)
    exp = export_qdq(unet, result, tmp_path_factory.mktemp("u2c-fp16"), target="trt", fusion=False, **U2C)
    return unet, result, exp


def _types(path):
    m = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    t = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(m.graph.input)
         + list(m.graph.output)}
    t.update({i.name: i.data_type for i in m.graph.initializer})
    return m, t


def test_default_fp16_types_and_islands(u2c_fp16):
    _, _, exp = u2c_fp16
    assert exp.graph_precision == {"trt": "fp16"}
    assert exp.report()["graph_precision"] == {"trt": "fp16"}
    m, t = _types(exp.graphs["trt"][0])
    # graph I/O float32 for every precision: the runner and the TensorRT backend see the same I/O
    assert t["sample"] == F32 and t["encoder_hidden_states"] == F32 and t["out_sample"] == F32
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:  # scales FP16: a strongly typed DQ outputs its scale's type
        assert t[n.input[1]] == F16, n.name
        assert t[n.output[0] if n.op_type == "DequantizeLinear" else n.input[0]] == F16, n.name
    islands = HP.fp32_islands(m)
    ops = {(m.graph.node[k].op_type, r) for k, r in islands.items()}
    assert ("Sin", "embedding") in ops and ("Cos", "embedding") in ops  # the timestep projection
    assert ("InstanceNormalization", "normalization") in ops  # GroupNorm statistics
    for k, r in islands.items():
        n = m.graph.node[k]
        if n.op_type in ("Sin", "Cos", "InstanceNormalization"):
            assert t[n.output[0]] == F32
    # everything else that computes on the stream is FP16: every Conv, MatMul, Softmax
    for n in m.graph.node:
        if n.op_type in ("Conv", "Softmax") or (n.op_type == "MatMul" and "attn" in n.name):
            assert t[n.output[0]] == F16, n.name
    assert lint_model(exp.graphs["trt"][0], high_precision="fp16") == []


def test_fp16_parity_against_the_fp16_simulation(u2c_fp16):
    _, _, exp = u2c_fp16
    tol = 16 * 2.0 ** -10
    assert len(exp.checks) == 2
    for c in exp.checks:
        assert c.ok and c.verdict in ("within-tolerance", "rounding-flips"), c
        assert c.forced_rel_l2 <= tol and c.forced["forced_worst_input_rel_l2"] <= tol, c
        assert c.forced["forced_bad_outputs"] == 0, c
        assert c.fp_rel_l2 < 0.1


def test_fp16_parity_catches_a_wrong_graph(u2c_fp16):
    """Group 1's graph checked as group 0 (other activation scales): the teacher-forced check fails."""
    from adpdm_export.qdq_parity import check_group_graph, sim_in_precision
    from calibration.quant_unet import quantize_model

    unet, result, exp = u2c_fp16
    sim = sim_in_precision(quantize_model(unet, result=result).eval(), "fp16")
    c = check_group_graph(exp.graphs["trt"][1], sim, unet, result, 0, "trt", U2C["sample_shape"], U2C["conditioning"],
                          parity_tol=16 * 2.0 ** -10, precision="fp16")
    assert not c.ok and c.forced["forced_bad_outputs"] > 0


@pytest.mark.parametrize("precision, elem", [("bf16", BF16), ("fp32", F32)])
def test_bf16_and_fp32(tmp_path, precision, elem):
    unet = tiny_unet2d()
    result = quick_result(unet, **U2D)
    exp = export_qdq(unet, result, tmp_path, target="trt", fusion=False, high_precision=precision, **U2D)
    m, t = _types(exp.graphs["trt"][0])
    floats = {v for k, v in t.items() if v in (F32, F16, BF16)}
    assert F16 not in floats and elem in floats
    assert lint_model(exp.graphs["trt"][0], high_precision=precision) == []
    if precision == "bf16":  # no CPU runtime runs BF16 Conv: parity skipped, said so
        assert exp.checks == [] and "trt" in exp.parity_skipped
        assert next(o.version for o in m.opset_import if o.domain == "") >= 22  # BF16 Conv needs opset 22
    else:  # the FP32 graphs as before: bit-exact parity path, every float tensor FP32
        assert floats == {F32}
        assert all(c.forced_rel_l2 < 1e-5 for c in exp.checks)


def test_the_cpu_target_stays_fp32_and_refuses_the_flag(tmp_path):
    assert HP.parse_high_precision(None, ("ort",)) == "fp32"
    assert HP.parse_high_precision(None, ("trt", "ort")) == "fp16"
    assert HP.parse_high_precision("fp32", ("ort",)) == "fp32"
    with pytest.raises(AdpdmError, match="TensorRT target only"):
        HP.parse_high_precision("fp16", ("ort",))
    with pytest.raises(AdpdmError, match="unknown high precision"):
        HP.parse_high_precision("fp8", ("trt",))
    unet = tiny_unet2d()
    result = quick_result(unet, **U2D)
    exp = export_qdq(unet, result, tmp_path, target="both", check=False, fusion=False, one_session=False, **U2D)
    assert exp.graph_precision == {"trt": "fp16", "ort": "fp32"}
    _, t = _types(exp.graphs["ort"][0])
    assert F16 not in set(t.values())


# --------------------------------------------------------------------------- the linter's rule


def _fp16_graph(tmp_path):
    unet = tiny_unet2d()
    result = quick_result(unet, **U2D)
    exp = export_qdq(unet, result, tmp_path, target="trt", check=False, fusion=False, **U2D)
    return onnx.load(str(exp.graphs["trt"][0]))


def test_lint_flags_an_fp32_island_outside_the_documented_ones(tmp_path):
    m = _fp16_graph(tmp_path)
    assert lint_model(m, high_precision="fp16") == []
    # a Softmax computed in FP32 (Casts around it), as an FP32 graph would
    k, sm = next((k, n) for k, n in enumerate(m.graph.node) if n.op_type == "Softmax")
    up = helper.make_node("Cast", [sm.input[0]], ["sm_in_fp32"], name="up", to=F32)
    down = helper.make_node("Cast", ["sm_out_fp32"], [sm.output[0]], name="down", to=F16)
    sm.input[0], sm.output[0] = "sm_in_fp32", "sm_out_fp32"
    m.graph.node.insert(k, up)
    m.graph.node.insert(k + 2, down)
    v = [x for x in lint_model(m, high_precision="fp16") if x.rule == "high-precision"]
    assert v and v[0].node == sm.name


def test_lint_flags_an_fp32_scale_and_fp16_io(tmp_path):
    m = _fp16_graph(tmp_path)
    ix = {t.name: t for t in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[1].endswith("input_quantizer.scale"))
    s = ix[dq.input[1]]
    s.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(s).astype(np.float32), s.name))
    rules = {x.rule for x in lint_model(m, high_precision="fp16")}
    assert {"scale-dtype", "high-precision"} <= rules
    m = _fp16_graph(tmp_path / "b")
    m.graph.input[0].type.tensor_type.elem_type = F16  # the runner feeds float32
    v = [x for x in lint_model(m) if x.rule == "high-precision"]
    assert v and v[0].node == "sample"
    # a graph all in FP32 fails an explicit fp16 requirement
    m = onnx.load(str(export_qdq(tiny_unet2d(), quick_result(tiny_unet2d(), **U2D), tmp_path / "c", target="trt", check=False,
                                 fusion=False, high_precision="fp32", **U2D).graphs["trt"][0]))
    assert lint_model(m) == [] and any(x.rule == "high-precision" for x in lint_model(m, high_precision="fp16"))


def test_scales_the_precision_cannot_hold():
    with pytest.raises(AdpdmError, match="smallest normal"):
        HP.check_scale("x.scale", 1e-6, "fp16")
    HP.check_scale("x.scale", 1e-6, "bf16")
    HP.check_scale("x.scale", 1e-30, "fp32")


def test_manifest_records_the_precision(tmp_path):
    from dataclasses import replace

    from engines.manifest import load_manifest, write_manifest
    from engines.manifest_schema import validate_manifest
    from test_manifest import make_folder

    m = make_folder(tmp_path)
    with pytest.raises(AdpdmError, match="graph_precision"):
        validate_manifest(replace(m, graph_precision={"trt": "fp8"}))
    assert "graph_precision" not in m.to_dict()  # older manifests keep their keys
    write_manifest(tmp_path, replace(m, graph_precision={"trt": "bf16"}))
    assert load_manifest(tmp_path).graph_precision == {"trt": "bf16"}
