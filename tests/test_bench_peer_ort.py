"""The onnxruntime quantize_static peer (tools/bench_peers/ort_static.py) on a tiny UNet: which
tensors its QDQ graphs quantize (our scope vs its wide one) and that the output stays near FP."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.qconfig import DEFAULT_FP_LAYERS  # noqa: E402
from calibration.trajectories import generate_trajectories  # noqa: E402
from tiny_models import tiny_unet2d  # noqa: E402
from tools.bench_peers import CalibData, Scope, ort_static  # noqa: E402

from adpdm_export.model_loading import DEFAULT_SCHEDULER_CONFIG  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(ort_static.unavailable() is not None, reason=str(ort_static.unavailable())),
]

SCOPE = Scope(fp_layers=DEFAULT_FP_LAYERS)
SCOPE_CONV_IN = Scope(fp_layers=tuple(p for p in DEFAULT_FP_LAYERS if p != "conv_in"), conv_in_fp=False)
# measured on this tiny random model: rel L2 0.058-0.084 (minmax 0.063, wide 0.084); a broken graph is ~1
REL_L2_BOUND = 0.2


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet2d()
    traj = generate_trajectories(unet, dict(DEFAULT_SCHEDULER_CONFIG), num_samples=4, num_steps=4, seed=0)
    held = generate_trajectories(unet, dict(DEFAULT_SCHEDULER_CONFIG), num_samples=2, num_steps=4, seed=7)
    x = torch.cat([held.x_t[i].float() for i in range(4)])
    t = torch.cat([torch.full((2,), int(held.timesteps[i])) for i in range(4)])
    with torch.no_grad():
        ref = unet(x, t).sample
    return unet, CalibData(traj, batch_size=4), x, t, ref


_built: dict = {}


def build(setup, variant, scope, tmp_path_factory):
    key = (variant, scope.conv_in_fp)
    if key not in _built:
        unet, calib, x, t, ref = setup
        pm = ort_static.quantize(unet, calib, scope, variant, tmp_path_factory.mktemp(variant), log=lambda s: None)
        rel = ((pm.model(x, t) - ref).norm() / ref.norm()).item()
        _built[key] = (pm, rel, onnx.load(str(pm.onnx_path), load_external_data=False))
    return _built[key]


def _graph_maps(m):
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _input_quantized(m, producer) -> dict[str, bool]:
    """Conv/MatMul/Gemm node name -> its activation input comes through Q -> DQ."""
    out = {}
    for n in m.graph.node:
        if n.op_type in ort_static.OP_TYPES:
            dq = producer.get(n.input[0])
            out[n.name] = (dq is not None and dq.op_type == "DequantizeLinear"
                           and producer.get(dq.input[0]) is not None
                           and producer[dq.input[0]].op_type == "QuantizeLinear")
    return out


def test_node_module_mapping():
    assert ort_static.node_module("/unet/down_blocks.0/resnets.0/conv1/Conv") == "down_blocks.0.resnets.0.conv1"
    assert ort_static.node_module("/unet/mid_block/attentions.0/to_out.0/MatMul") == "mid_block.attentions.0.to_out.0"
    assert ort_static.node_module("/unet/mid_block/attentions.0/MatMul_1") == "mid_block.attentions.0"
    assert ort_static.node_module("/unet/conv_in/Conv") == "conv_in"
    assert ort_static.node_module("Conv_12") is None
    assert ort_static.unavailable() is None
    assert set(ort_static.VARIANTS) == {"minmax", "percentile", "entropy", "minmax-wide", "minmax-wide-u8"}
    assert ort_static._CONFIGS["minmax-wide-u8"] is ort_static.FASTEST  # the quality row is the graph bench_speed times
    assert set(ort_static.OWN_SCOPE) == {"minmax-wide", "minmax-wide-u8"}


@pytest.mark.parametrize("scope", [SCOPE, SCOPE_CONV_IN], ids=["conv_in_fp", "conv_in_quantized"])
def test_minmax_quantizes_inputs_of_scope_only(setup, scope, tmp_path_factory):
    unet = setup[0]
    pm, rel, m = build(setup, "minmax", scope, tmp_path_factory)
    producer, consumers = _graph_maps(m)
    quantized = _input_quantized(m, producer)
    wanted = set(scope.quantized_modules(unet))
    for name, q in quantized.items():
        assert q == (ort_static.node_module(name) in wanted), name
    assert quantized["/unet/conv_in/Conv"] == (not scope.conv_in_fp)
    assert not quantized["/unet/conv_out/Conv"]
    assert not any(q for n, q in quantized.items() if "time_emb" in n)  # time_embedding.*, *time_emb_proj
    assert pm.extra["quantized_nodes"] == len(wanted) and not pm.extra["not_quantized"]
    # only Conv/MatMul/Gemm read activation DQ outputs: outputs and residual paths stay FP
    for n in m.graph.node:
        q = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            assert {c.op_type for c in consumers.get(n.output[0], [])} <= set(ort_static.OP_TYPES), n.name
    assert rel < REL_L2_BOUND


def test_wide_quantizes_outputs_too(setup, tmp_path_factory):
    unet = setup[0]
    pm, rel, m = build(setup, "minmax-wide", SCOPE, tmp_path_factory)
    producer, consumers = _graph_maps(m)
    assert sum(_input_quantized(m, producer).values()) == len(SCOPE.quantized_modules(unet))
    assert pm.extra["output_quantized_nodes"] == pm.extra["quantized_nodes"]
    conv = m.graph.node[[n.name for n in m.graph.node].index("/unet/down_blocks.0/resnets.0/conv1/Conv")]
    assert any(c.op_type == "QuantizeLinear" for c in consumers[conv.output[0]])
    assert rel < REL_L2_BOUND


@pytest.mark.parametrize("variant", ["percentile", "entropy"])
def test_histogram_variants_close_to_fp(setup, variant, tmp_path_factory):
    pm, rel, _ = build(setup, variant, SCOPE, tmp_path_factory)
    assert pm.extra["quantized_nodes"] == len(SCOPE.quantized_modules(setup[0]))
    assert pm.extra["collect_calls"] == 4 and pm.extra["histogram_bins_max"] >= 128
    assert rel < REL_L2_BOUND


def test_w8a6_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="W8A8 only"):
        ort_static.quantize(setup[0], setup[1], Scope(a_bits=6, fp_layers=DEFAULT_FP_LAYERS), "minmax", tmp_path)


def test_fastest_graph_is_wide_uint8(setup, tmp_path):
    path = ort_static.fastest_qdq_graph(setup[0], setup[1], SCOPE, tmp_path, log=lambda s: None)
    m = onnx.load(str(path), load_external_data=False)
    summary = ort_static.qdq_summary(path)
    assert len(summary["output_quantized"]) == len(summary["input_quantized"]) == len(SCOPE.quantized_modules(setup[0]))
    zps = {i.name: i.data_type for i in m.graph.initializer}
    act_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert act_q and all(zps[n.input[2]] == onnx.TensorProto.UINT8 for n in act_q)
