"""QDQ export (`adpdm_export.qdq_export`): group graphs identical but for activation scales, one
shared weights file, the quantization contract on the graphs, dedupe, stale graphs replaced,
refusals (W4A8 on TensorRT, A6), INT4 weights for onnxruntime, the reference model end to end.
Parity itself: tests/test_qdq_parity.py; the shared exports: `u2d_export` in conftest.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper as nh

from adpdm_export import qdq_graph_passes as P
from adpdm_export.qdq_export import REPORT_NAME, WEIGHTS_NAME, export_qdq
from adpdm_export.qdq_lint import lint_model
from adpdm_export.qdq_report import read_report, report_to_disk
from engines.errors import AdpdmError
from qdq_fixtures import U2D, quick_result
from tiny_models import tiny_unet2d


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- files and structure


def test_files_and_one_shared_weights_file(u2d_export):
    _, result, exp = u2d_export
    out = exp.out_dir
    names = sorted(p.name for p in out.iterdir())
    want = sorted([WEIGHTS_NAME, REPORT_NAME] + [f"unet.g{k}.onnx" for k in range(2)] + [f"unet.g{k}.ort.onnx" for k in range(2)]
                  + ["unet.shared.ort.onnx", "unet.shared.ort.data", "unet.shared.groups.npz"])  # one session (issue 16)
    assert names == want  # nothing staged left behind; the group graphs' weights are in one file
    for f in exp.graphs["trt"] + exp.graphs["ort"]:
        m = onnx.load(str(f), load_external_data=False)
        locs = {e.value for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
        assert locs == {WEIGHTS_NAME}
        onnx.checker.check_model(str(f))
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["num_groups"] == 2 and report["weights_file"] == WEIGHTS_NAME
    # the graph targets under their historical keys; read_report gives them the code's names
    assert list(report)[0] == "profiles" and report["profiles"] == ["trt", "ort"]
    assert {c["profile"] for c in report["checks"]} == {"trt", "ort"} and "target" not in report["checks"][0]
    code = read_report(out / REPORT_NAME)
    assert code["targets"] == ["trt", "ort"] and [c["target"] for c in code["checks"]] == [c.target for c in exp.checks]
    assert report_to_disk(code) == report and json.dumps(report_to_disk(code)) == json.dumps(report)


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_group_graphs_identical_but_activation_scales(u2d_export, target):
    _, result, exp = u2d_export
    models = [onnx.load(str(f), load_external_data=False) for f in exp.graphs[target]]
    scales = exp.activation_scales[target]
    P.assert_identical_but_scales(models, scales)
    # ... and the scales do differ, with group k's calibrated values
    by_name = [{t.name: t for t in m.graph.initializer} for m in models]
    differing = [s for s in scales if nh.to_array(by_name[0][s]) != nh.to_array(by_name[1][s])]
    assert len(differing) == len(scales)
    for k in range(2):
        for s in scales:
            q = s[: -len(".scale")]
            assert np.float32(nh.to_array(by_name[k][s])) == np.float32(result.activation_scales[q][k])
            assert by_name[k][s].data_location != TensorProto.EXTERNAL  # inline, small
    # a changed node is caught
    models[1].graph.node[5].name += "_renamed"
    with pytest.raises(AdpdmError, match="differs"):
        P.assert_identical_but_scales(models, scales)


def test_quantization_contract_on_trt_graphs(u2d_export):
    _, result, exp = u2d_export
    for f in exp.graphs["trt"]:
        assert lint_model(f) == []
    m = onnx.load(str(exp.graphs["trt"][0]))
    assert P.opset_version(m) >= 19
    ix = P.GraphIndex(m)
    pairs = P.qdq_pairs(m, ix)
    weights = [p for p in pairs if p.is_weight]
    acts = [p for p in pairs if not p.is_weight]
    assert len(weights) == exp.folded_weights == len(result.weight_scales)
    for p in weights:
        assert p.q is None  # folded: no Q on weights
        w = ix.inits[p.dq.input[0]]
        assert w.data_type == TensorProto.INT8
        assert P.attr(p.dq, "axis") == 0
        scale = nh.to_array(ix.inits[p.dq.input[1]])
        assert scale.shape == (w.dims[0],) and (scale > 0).all()
        assert not nh.to_array(ix.inits[p.dq.input[2]]).any()
        q = p.dq.input[1][: -len(".scale")]
        np.testing.assert_array_equal(scale, result.weight_scales[q].numpy())
    for p in acts:
        s = nh.to_array(ix.inits[p.q.input[1]])
        z = nh.to_array(ix.inits[p.q.input[2]])
        assert s.shape == () and s > 0 and z.dtype == np.int8 and z == 0


def test_weights_are_the_simulated_weights_bit_for_bit(u2d_export):
    """int8 * scale (what DequantizeLinear computes) == the wrapper's fake-quantized weight."""
    unet, result, exp = u2d_export
    from calibration.quant_unet import quantize_model, weight_quantizers

    qm = quantize_model(unet, result=result)
    m = onnx.load(str(exp.graphs["trt"][0]))
    ix = P.GraphIndex(m)
    wq = weight_quantizers(qm)
    modules = dict(qm.named_modules())
    for p in P.qdq_pairs(m, ix):
        if not p.is_weight:
            continue
        q = p.dq.input[1][: -len(".scale")]
        layer = modules[q.rsplit(".", 1)[0]]
        with torch.no_grad():
            sim = wq[q](layer.weight).numpy()
        w = nh.to_array(ix.inits[p.dq.input[0]]).astype(np.float32)
        s = nh.to_array(ix.inits[p.dq.input[1]]).reshape(-1, *[1] * (w.ndim - 1))
        np.testing.assert_array_equal(w * s, sim)


def test_every_simulated_quantizer_is_in_the_graph(u2d_export):
    """Q/DQ exactly where the wrapper simulates them: the set of quantizers matches, per target."""
    unet, result, exp = u2d_export
    roles = {q["name"]: q["role"] for q in result.activation_quantizers}
    in_trt = {s[: -len(".scale")] for s in exp.activation_scales["trt"]}
    in_ort = {s[: -len(".scale")] for s in exp.activation_scales["ort"]}
    assert in_trt == {n for n, r in roles.items() if r != "output"}
    assert in_ort == set(roles)


def test_shared_qkv_input_has_one_qdq(u2d_export):
    _, _, exp = u2d_export
    m = onnx.load(str(exp.graphs["trt"][0]), load_external_data=False)
    ix = P.GraphIndex(m)
    for att in ("/unet/down_blocks.1/attentions.0/", "/unet/mid_block/attentions.0/"):
        mm = [n for n in m.graph.node if n.op_type == "MatMul" and any(n.name.startswith(f"{att}to_{x}/") for x in "qkv")]
        assert len(mm) == 3
        sources = {ix.producer[n.input[0]].name for n in mm}
        assert len(sources) == 1, sources  # one DequantizeLinear feeds q, k and v


def test_dedupe_merges_identical_pairs_only():
    """Two identical Q/DQ pairs on one tensor become one; a pair with another scale stays."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 4]) for i in range(3)]
    inits = [nh.from_array(np.float32(0.1), "a.scale"), nh.from_array(np.float32(0.1), "b.scale"),
             nh.from_array(np.float32(0.2), "c.scale"), nh.from_array(np.int8(0), "zp")]
    nodes = []
    for i, s in enumerate(("a.scale", "b.scale", "c.scale")):
        nodes += [helper.make_node("QuantizeLinear", ["x", s, "zp"], [f"q{i}"], name=f"Q{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", s, "zp"], [f"d{i}"], name=f"DQ{i}"),
                  helper.make_node("Relu", [f"d{i}"], [f"y{i}"], name=f"R{i}")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 19)])
    assert P.dedupe_activation_qdq(m) == 1
    ops = [n.name for n in m.graph.node]
    assert "Q1" not in ops and "Q2" in ops
    assert next(n for n in m.graph.node if n.name == "R1").input[0] == "d0"
    assert "b.scale" not in {t.name for t in m.graph.initializer}


def test_fold_weight_quantizer_matches_torch_rounding():
    """quantize_weight rounds half to even on w * float32(1/s), as torch.fake_quantize does."""
    rs = np.random.RandomState(0)
    w = rs.randn(8, 3, 3, 3).astype(np.float32)
    s = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32)
    w[0, 0, 0, 0] = np.float32(2.5) * s[0]  # an exact tie
    q = P.quantize_weight(w, s, 8)
    ref = torch.fake_quantize_per_channel_affine(torch.from_numpy(w), torch.from_numpy(s), torch.zeros(8, dtype=torch.int32), 0, -128, 127)
    np.testing.assert_array_equal(q.astype(np.float32) * s.reshape(-1, 1, 1, 1), ref.numpy())


def test_tracer_external_tensors_give_the_same_export(tmp_path, monkeypatch):
    """Over 2 GB the tracer stores large tensors in files of their own: the fold reads each weight
    from its file (the FP32 weights never enter the message) and the export is byte for byte the
    one from an inline trace; the tracer's files are gone afterwards."""
    from adpdm_export import onnx_export

    unet = tiny_unet2d()
    result = quick_result(unet, groups=2, **U2D)
    inline = export_qdq(unet, result, tmp_path / "inline", target="both", check=False, **U2D)

    real_trace = onnx_export.trace_to_onnx
    read_from_files = []

    def trace_like_over_2gb(module, raw_path, inputs, opset):
        real_trace(module, raw_path, inputs, opset)
        m = onnx.load(str(raw_path))
        onnx.save_model(m, str(raw_path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=64,
                        convert_attribute=True)  # Constant nodes' tensors too, as the tracer stores them
        assert len(list(raw_path.parent.iterdir())) > 10  # one file per large tensor, as the tracer writes them

    real_read = P.read_tensor

    def spy_read(t, base_dir=None):
        if onnx.external_data_helper.uses_external_data(t):
            read_from_files.append(t.name)
        return real_read(t, base_dir)

    monkeypatch.setattr(onnx_export, "trace_to_onnx", trace_like_over_2gb)
    monkeypatch.setattr(P, "read_tensor", spy_read)
    external = export_qdq(unet, result, tmp_path / "external", target="both", check=False, **U2D)
    assert len(read_from_files) >= external.folded_weights == inline.folded_weights > 0
    for f in sorted(p.name for p in (tmp_path / "inline").iterdir()):
        if f != REPORT_NAME:
            assert (tmp_path / "external" / f).read_bytes() == (tmp_path / "inline" / f).read_bytes(), f
    assert sorted(p.name for p in (tmp_path / "external").iterdir()) == sorted(p.name for p in (tmp_path / "inline").iterdir())


def test_external_initializer_needs_a_folder():
    t = nh.from_array(np.zeros(4, np.float32), "w")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.external_data.add(key="location", value="w.bin")
    with pytest.raises(AdpdmError, match="stored outside the graph"):
        P.read_tensor(t)


def test_rerun_replaces_stale_group_graphs(tmp_path):
    """A second export with fewer groups into the same folder leaves no stale group graph."""
    unet = tiny_unet2d()
    (tmp_path / "unet.g7.onnx").write_bytes(b"stale")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("user file")
    exp = export_qdq(unet, quick_result(unet, groups=1, **U2D), tmp_path, target="trt", check=False, **U2D)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["notes.txt", WEIGHTS_NAME, REPORT_NAME, "unet.g0.onnx"])
    assert exp.num_groups == 1


# --------------------------------------------------------------------------- refusals and INT4


def test_w4a8_refused_for_tensorrt(tmp_path):
    unet = tiny_unet2d()
    result = quick_result(unet, w_bits=4, **U2D)
    for target in ("trt", "both"):
        with pytest.raises(AdpdmError, match="W4A8 cannot go to TensorRT"):
            export_qdq(unet, result, tmp_path, target=target, **U2D)
    assert not list(tmp_path.glob("*.onnx"))


def test_low_bit_activations_refused(tmp_path):
    unet = tiny_unet2d()
    result = quick_result(unet, a_bits=6, **U2D)
    with pytest.raises(AdpdmError, match="A6 activations cannot be exported"):
        export_qdq(unet, result, tmp_path, target="ort", **U2D)


def test_w4a8_for_onnxruntime(tmp_path):
    unet = tiny_unet2d()
    result = quick_result(unet, w_bits=4, **U2D)
    exp = export_qdq(unet, result, tmp_path, target="ort", fusion=False, **U2D)
    m = onnx.load(str(exp.graphs["ort"][0]))
    assert P.opset_version(m) >= 21
    ix = P.GraphIndex(m)
    weights = [p for p in P.qdq_pairs(m, ix) if p.is_weight]
    assert weights and all(ix.inits[p.dq.input[0]].data_type == TensorProto.INT4 for p in weights)
    assert all(P.attr(p.dq, "axis") == 0 for p in weights)
    vals = nh.to_array(ix.inits[weights[0].dq.input[0]]).astype(np.int64)
    assert vals.min() >= -8 and vals.max() <= 7
    for c in exp.checks:
        assert c.ok and c.forced_rel_l2 < 1e-5, c


def test_unknown_target_refused(u2d_export, tmp_path):
    unet, result, _ = u2d_export
    with pytest.raises(AdpdmError, match="unknown target"):
        export_qdq(unet, result, tmp_path, target="tensorrt", **U2D)


@pytest.mark.slow
def test_reference_model_both_targets(tmp_path):
    """The bundled reference UNet: 4 groups, both targets, parity and fusion."""
    from adpdm_export.model_loading import REFERENCE_DIR, load_model
    from adpdm_export.qdq_export import export_qdq_for

    if not (REFERENCE_DIR / "unet" / "config.json").is_file():
        pytest.skip("the bundled reference model is not installed")
    loaded = load_model("reference")
    result = quick_result(loaded.unet, loaded.sample_shape, loaded.conditioning, groups=4)
    exp = export_qdq_for(loaded, result, tmp_path, target="both")  # the TensorRT target in FP16 (default)
    assert len(exp.checks) == 8 and exp.graph_precision == {"trt": "fp16", "ort": "fp32"}
    for c in exp.checks:
        forced_tol = 1e-5 if c.target == "ort" else 16 * 2.0 ** -10
        assert c.ok and c.forced_rel_l2 < forced_tol and c.forced["forced_bad_outputs"] == 0, c
        assert c.fp_rel_l2 < 0.1, c
    for f in exp.graphs["trt"]:
        assert lint_model(f, high_precision="fp16") == []
    assert exp.fusion["ort"]["ratio"] >= 0.95
    from engines.manifest import load_manifest

    assert load_manifest(tmp_path).targets() == ["trt", "ort"]
