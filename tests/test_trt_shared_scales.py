"""One TensorRT engine for all groups (issue 16, engines/trt_shared_scales.py): unit-scale Q/DQ, the per-group
activation scales as the runtime input `adpdm_group_scales`.

The rewrite's arithmetic is checked here with onnxruntime on the CPU (optimizations off, so the graphs' own Q/DQ
arithmetic): group k's graph vs the shared graph fed group k's scales, on the bundled reference model's TensorRT-
target graphs. The engine build runs where TensorRT and a CUDA GPU exist (marked `tensorrt`) and is skipped with
the reason elsewhere.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engines.errors import AdpdmError
from engines.platform import cuda_status, tensorrt_status
from engines.trt_shared_scales import GROUP_SCALES_INPUT, load_group_scales, shared_scale_graph

TRT_OK, TRT_WHY = tensorrt_status()
GPU_OK, GPU_WHY = cuda_status()
GROUPS = 3


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def trt_export(tmp_path_factory, request):
    """The bundled reference UNet, quick-calibrated with 3 groups, exported for the TensorRT target in its
    default FP16 outside the INT8 layers, and in FP32."""
    import torch

    from adpdm_export.model_loading import REFERENCE_DIR, load_model
    from adpdm_export.qdq_export import export_qdq_for
    from qdq_fixtures import quick_result

    if not (REFERENCE_DIR / "unet" / "config.json").is_file():
        pytest.skip("the bundled reference model is not installed")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model("reference")
        result = quick_result(loaded.unet, loaded.sample_shape, loaded.conditioning, groups=GROUPS)
        out = tmp_path_factory.mktemp("trt-shared")
        export_qdq_for(loaded, result, out, target="trt", check=False, high_precision=request.param)
    finally:
        torch.set_num_threads(n)
    return out


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_shared_scale_graph_matches_every_group_graph(trt_export):
    graphs = [trt_export / f"unet.g{k}.onnx" for k in range(GROUPS)]
    files = shared_scale_graph(graphs, trt_export)
    names, table = load_group_scales(files.scales)
    assert table.shape == (GROUPS, len(names)) and len(names) > 0
    m = onnx.load(str(files.graph), load_external_data=False)
    qdq_scales = {n.input[1] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and n.input[0] not in {t.name for t in m.graph.initializer}}
    assert qdq_scales == {"adpdm.unit_scale"}  # every activation Q/DQ scale is the constant 1
    assert not set(names) & {t.name for t in m.graph.initializer}  # no group's scale is left in the graph
    manifest = json.loads((trt_export / "manifest.json").read_text())
    T = manifest["timestep_to_group"]
    shared = _session(files.graph)
    rng = np.random.default_rng(0)
    worst = 0.0
    for k in range(GROUPS):
        x = rng.standard_normal((3, 1, 32, 32)).astype(np.float32)
        feeds = {"sample": x, "timestep": np.array([T.index(k)] * 3, dtype=np.int64)}
        if "class_labels" in manifest["model"]["conditioning"]:
            feeds["class_labels"] = np.array([1, 2, 3], dtype=np.int64)
        ref = _session(graphs[k]).run(None, feeds)[0]
        got = shared.run(None, {**feeds, GROUP_SCALES_INPUT: table[k]})[0]
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        worst = max(worst, rel)
        # Conv(q * s, W) vs s * Conv(q, W): float reassociation, which flips a few INT8 roundings downstream
        assert rel < 1e-2, (k, rel)
        other = shared.run(None, {**feeds, GROUP_SCALES_INPUT: table[(k + 1) % GROUPS]})[0]
        assert np.linalg.norm(other - ref) > np.linalg.norm(got - ref)  # the fed scales are what decides
    print(f"shared-scale graph vs group graphs: worst relative L2 {worst:.2e}")


def test_graphs_from_another_folder_or_template_are_refused(trt_export, tmp_path):
    with pytest.raises(AdpdmError, match="beside the group graphs"):
        shared_scale_graph([trt_export / "unet.g0.onnx"], tmp_path)


@pytest.mark.tensorrt
@pytest.mark.skipif(not (TRT_OK and GPU_OK), reason=f"needs TensorRT >= 10 and a CUDA GPU: TensorRT: {TRT_WHY}; "
                                                    f"GPU: {GPU_WHY}")
def test_one_engine_for_all_groups_builds_and_matches_onnxruntime(trt_export):
    import tensorrt as trt
    import torch

    from engines.manifest import load_manifest
    from engines.manifest_schema import TrtOptimizationProfile
    from engines.trt_builder import build_shared_scale_engine

    m = load_manifest(trt_export)
    res = build_shared_scale_engine(m.graph_paths("trt"), trt_export,
                                    TrtOptimizationProfile(batch=(1, 2, 2), height=(32, 32, 32), width=(32, 32, 32)),
                                    m.model.in_channels, m.model.conditioning, opt_level=1)
    engine_path = res.engines[0]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    ctx = engine.create_execution_context()
    _, table = load_group_scales(trt_export / "unet.shared.trt.scales.npz")
    shared = _session(trt_export / "unet.shared.trt.onnx")
    T = m.timestep_to_group
    for k in range(GROUPS):
        x = torch.randn(2, 1, 32, 32, device="cuda")
        t = torch.full((2,), T.index(k), dtype=torch.int64, device="cuda")
        feeds = {"sample": x, "timestep": t, GROUP_SCALES_INPUT: torch.from_numpy(table[k]).cuda()}
        if "class_labels" in m.model.conditioning:
            feeds["class_labels"] = torch.tensor([1, 2], device="cuda")
        out = torch.empty(2, 1, 32, 32, device="cuda")
        for name, v in feeds.items():
            ctx.set_input_shape(name, tuple(v.shape))
            ctx.set_tensor_address(name, v.data_ptr())
        ctx.set_tensor_address("out_sample", out.data_ptr())
        stream = torch.cuda.current_stream()
        assert ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        ref = shared.run(None, {n: v.cpu().numpy() for n, v in feeds.items()})[0]
        got = out.cpu().numpy()
        assert np.abs(got - ref).mean() < 2e-2, k  # trt_check's default tolerance (mean absolute error)
