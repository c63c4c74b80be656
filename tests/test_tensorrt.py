"""TensorRT: builder + backend round trip on a tiny graph (marked `tensorrt`, needs TensorRT and a CUDA GPU),
and, everywhere, the clear errors where TensorRT or a GPU is missing and the pure helpers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engines.build import build_trt_engines, make_optimization_profile
from engines.errors import AdpdmError
from engines.manifest import load_manifest, write_manifest
from engines.manifest_schema import MANIFEST_NAME, TensorrtInfo, TrtOptimizationProfile, with_tensorrt
from engines.platform import cuda_status, pick_backend, tensorrt_status
from engines.runner import TimestepDispatchRunner
from engines.trt_backend import check_engine_platform
from engines.trt_builder import optimization_profile_shapes
from engines_fixtures import copy_build, make_build

TRT_OK, TRT_WHY = tensorrt_status()
GPU_OK, GPU_WHY = cuda_status()
needs_trt = pytest.mark.skipif(
    not (TRT_OK and GPU_OK),
    reason=f"needs TensorRT >= 10 and a CUDA GPU: TensorRT: {TRT_WHY}; GPU: {GPU_WHY}",
)


@pytest.fixture(scope="module")
def onnx_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt_src")
    make_build(folder, num_groups=2, targets=("trt", "ort"))
    return folder


def fake_trt_build(src, dst):
    """A "trt" manifest over placeholder engine files (for the checks that run without TensorRT)."""
    b = copy_build(src, dst)
    m = load_manifest(b)
    for k in range(2):
        (b / f"unet.g{k}.plan").write_bytes(b"not an engine %d" % k)
    info = TensorrtInfo(
        tensorrt_version="10.8.0.43", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        optimization_profile=TrtOptimizationProfile(batch=(1, 4, 4), height=(16, 16, 16), width=(16, 16, 16)), batch_sizes=[1, 4], opt_level=3,
    )
    write_manifest(b, with_tensorrt(m, info, ["unet.g0.plan", "unet.g1.plan"]))
    return b


# ------------------------------------------------------------------ everywhere


def test_status_functions():
    for ok, msg in (tensorrt_status(), cuda_status()):
        assert isinstance(ok, bool) and isinstance(msg, str) and msg and "\n" not in msg
    assert pick_backend("auto") == ("trt" if TRT_OK and GPU_OK else "ort")
    assert pick_backend("ort") == "ort"
    with pytest.raises(AdpdmError, match="unknown backend"):
        pick_backend("tensorrt")


@pytest.mark.skipif(TRT_OK and GPU_OK, reason="checks the errors where TensorRT or a GPU is missing")
def test_missing_tensorrt_is_one_clear_line(onnx_build, tmp_path):
    with pytest.raises(AdpdmError, match="needs TensorRT|needs a CUDA GPU") as e:
        pick_backend("trt")
    assert "\n" not in str(e.value)
    b = fake_trt_build(onnx_build, tmp_path / "b")
    from engines.trt_backend import TrtGroupEngines

    for make in (lambda: TimestepDispatchRunner(b, backend="trt"), lambda: TrtGroupEngines(load_manifest(b))):
        with pytest.raises(AdpdmError, match="the TensorRT backend needs") as e:
            make()
        assert "\n" not in str(e.value)
    # auto falls back to onnxruntime for a trt build
    assert TimestepDispatchRunner(b, backend="auto").backend == "ort"
    # the builder refuses before touching the folder
    before = (b / MANIFEST_NAME).read_bytes()
    with pytest.raises(AdpdmError, match="the TensorRT backend needs"):
        build_trt_engines(b, batch_sizes=[1, 2])
    assert (b / MANIFEST_NAME).read_bytes() == before


def test_engine_platform_mismatch_says_rebuild(onnx_build, tmp_path):
    m = load_manifest(fake_trt_build(onnx_build, tmp_path / "b"))
    check_engine_platform(m, "10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
    for args, what in [
        (("10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0"), "TensorRT 10.8.0.43 \\(this machine: 10.9.0.34\\)"),
        (("10.8.0.43", "NVIDIA L4", "8.9"), "GPU NVIDIA H100 80GB HBM3, compute capability 9.0 \\(this machine: NVIDIA L4, 8.9\\)"),
        (("10.8.0.43", "NVIDIA H200", "9.0"), "GPU NVIDIA H100"),
    ]:
        with pytest.raises(AdpdmError, match=what + ".*rebuild them here"):
            check_engine_platform(m, *args)


def test_trt_build_manifest_round_trip_and_runner_checks(onnx_build, tmp_path):
    b = fake_trt_build(onnx_build, tmp_path / "b")
    m = load_manifest(b)
    assert m.backend == "trt" and [p.name for p in m.engine_paths()] == ["unet.g0.plan", "unet.g1.plan"]
    d = json.loads((b / MANIFEST_NAME).read_text())
    assert d["tensorrt"]["profile"] == {  # the optimization profile, under its historical key
       "batch": [1, 4, 4], "height": [16, 16, 16], "width": [16, 16, 16], "sequence_length": None}
    assert {f["path"] for f in d["files"]} >= {"unet.g0.plan", "unet.g1.plan", "unet.g0.onnx", "unet.g0.ort.onnx"}


def test_optimization_profiles():
    class M:  # the manifest fields make_optimization_profile reads
        class model:
            sample_size = (32, 32)
            conditioning = {"encoder_hidden_states": {"dim": 768}}

    p = make_optimization_profile([4, 1, 2], None, M)
    assert p.batch == (1, 4, 4) and p.height == (32, 32, 32) and p.width == (32, 32, 32) and p.sequence_length == 77
    p = make_optimization_profile([1], ((16, 64), (16, 64)), M, sequence_length=16)
    assert p.height == (16, 32, 64) and p.sequence_length == 16
    with pytest.raises(AdpdmError, match="batch sizes must be positive"):
        make_optimization_profile([0], None, M)
    shapes = optimization_profile_shapes(["sample", "timestep", "encoder_hidden_states"], 4, p, M.model.conditioning)
    assert shapes["sample"] == ((1, 4, 16, 16), (1, 4, 32, 32), (1, 4, 64, 64))
    assert shapes["timestep"] == ((1,), (1,), (1,))
    assert shapes["encoder_hidden_states"] == ((1, 16, 768),) * 3
    with pytest.raises(AdpdmError, match="does not know"):
        optimization_profile_shapes(["mask"], 4, p, {})


# ------------------------------------------------------------------ on a GPU with TensorRT


@pytest.fixture(scope="module")
def trt_build(onnx_build, tmp_path_factory):
    if not (TRT_OK and GPU_OK):
        pytest.skip(f"needs TensorRT >= 10 and a CUDA GPU: TensorRT: {TRT_WHY}; GPU: {GPU_WHY}")
    b = copy_build(onnx_build, tmp_path_factory.mktemp("trt") / "b")
    seen = []
    m = build_trt_engines(b, batch_sizes=[1, 2, 4], opt_level=1, on_group=lambda k, n, s: seen.append(k))
    assert seen == [0, 1]
    return b, m


@pytest.mark.tensorrt
@needs_trt
def test_build_writes_engines_cache_and_manifest(trt_build):
    b, m = trt_build
    loaded = load_manifest(b)
    assert loaded.backend == "trt" and loaded.to_dict() == m.to_dict()
    assert (b / "unet.g0.plan").stat().st_size > 0 and (b / "timing.cache").stat().st_size > 0
    info = loaded.tensorrt
    assert info.optimization_profile.batch == (1, 4, 4) and info.batch_sizes == [1, 2, 4] and info.strongly_typed
    import tensorrt as trt

    assert info.tensorrt_version == trt.__version__
    assert info.compute_capability == "%d.%d" % torch.cuda.get_device_capability()


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_trt_runner_matches_onnxruntime(trt_build, cuda_graphs):
    b, _ = trt_build
    trt_runner = TimestepDispatchRunner(b, backend="trt", cuda_graphs=cuda_graphs)
    ort_runner = TimestepDispatchRunner(b, backend="ort", target="trt")  # the same graphs in onnxruntime
    eng = trt_runner.group_backend
    # one device-memory block, sized for the largest engine, shared by every context
    assert eng.device_memory.numel() == max(eng._device_memory_size(e) for e in eng.engines)
    assert len(eng.contexts) == 2
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900, 20, 700])  # groups 1, 0, 1, 0 (mixed)
    for _ in range(2):  # second pass replays the captured graphs
        y = trt_runner(x, t)
        assert y.device == x.device  # returned where the input was
        torch.testing.assert_close(y, ort_runner(x, t), atol=1e-2, rtol=1e-2)  # TF32 convolutions
    xc = x.cuda()
    yc = trt_runner(xc, t.cuda())
    assert yc.is_cuda
    torch.testing.assert_close(yc.cpu(), y, atol=1e-5, rtol=1e-5)
    # batch 1, and a group-pure batch of 2
    torch.testing.assert_close(trt_runner(x[:1], 10), ort_runner(x[:1], 10), atol=1e-2, rtol=1e-2)
    x5 = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(5))  # above the largest batch: chunks
    torch.testing.assert_close(trt_runner(x5, 10), ort_runner(x5, 10), atol=1e-2, rtol=1e-2)
    with pytest.raises(AdpdmError, match="outside the TensorRT optimization profile"):
        trt_runner(torch.randn(1, 1, 32, 32), 10)
    trt_runner.close()


@pytest.mark.tensorrt
@needs_trt
def test_engines_from_another_gpu_are_refused(trt_build, tmp_path):
    b, m = trt_build
    other = tmp_path / "other"
    shutil.copytree(b, other)
    mm = load_manifest(other)
    mm.tensorrt.gpu_name = "Some Other GPU"
    write_manifest(other, mm)
    with pytest.raises(AdpdmError, match="rebuild them here"):
        TimestepDispatchRunner(other, backend="trt")
