"""The NVIDIA ModelOpt peer (tools/bench_peers/modelopt_int8.py) on a tiny UNet: it quantizes exactly
the benchmarks' scope (conv_in FP unless asked), stays near FP, and exports a QDQ graph that
onnxruntime runs. Skipped where nvidia-modelopt is not installed (CI does not install it)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (bench extra only)")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.qconfig import DEFAULT_FP_LAYERS  # noqa: E402
from calibration.trajectories import generate_trajectories  # noqa: E402
from tiny_models import tiny_unet2d  # noqa: E402
from tools.bench_peers import CalibData, Scope, modelopt_int8  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CONV_IN = tuple(p for p in DEFAULT_FP_LAYERS if p != "conv_in")


@pytest.fixture(scope="module")
def setup(one_thread):
    from adpdm_export.model_loading import DEFAULT_SCHEDULER_CONFIG

    unet = tiny_unet2d()
    traj = generate_trajectories(unet, dict(DEFAULT_SCHEDULER_CONFIG), num_samples=4, num_steps=3, seed=0)
    x = traj.x_t[-1].float()
    t = torch.full((x.shape[0],), int(traj.timesteps[-1]), dtype=torch.int64)
    with torch.no_grad():
        ref = unet(x, t).sample
    return unet, CalibData(traj), x, t, ref


def _rel(model, x, t, ref) -> float:
    with torch.no_grad():
        out = model(x, t).sample
    return float((out - ref).norm() / ref.norm())


def test_interface():
    assert modelopt_int8.NAME == "modelopt" and modelopt_int8.unavailable() is None
    assert set(modelopt_int8.VARIANTS) == {"max", "percentile"} and "W8A8" in modelopt_int8.BITS
    cfg = modelopt_int8.build_config(Scope(fp_layers=DEFAULT_FP_LAYERS), "max")["quant_cfg"]
    assert cfg[0] == {"quantizer_name": "*", "enable": False}  # the deny-all first (trap 1)
    with pytest.raises(ValueError):
        modelopt_int8.build_config(Scope(), "mse")


def test_max_w8a8_scope_and_onnx(setup, tmp_path):
    unet, calib, x, t, ref = setup
    scope = Scope(fp_layers=DEFAULT_FP_LAYERS)
    pm = modelopt_int8.quantize(unet, calib, scope, "max", tmp_path, log=lambda m: None)
    n = len(scope.quantized_modules(unet))
    assert pm.extra["enabled_quantizers"] == n and pm.extra["enabled_weight_quantizers"] == n
    assert not pm.model.conv_in.input_quantizer.is_enabled and not pm.model.conv_in.weight_quantizer.is_enabled
    assert not pm.model.conv_out.input_quantizer.is_enabled
    assert pm.model.down_blocks[0].resnets[0].conv1.weight_quantizer.amax.numel() == 16  # per output channel
    assert 0 < _rel(pm.model, x, t, ref) < 0.2
    assert _rel(unet, x, t, ref) == 0.0 and type(unet.conv_in) is torch.nn.Conv2d  # caller's unet untouched
    assert any("trap 1" in s for s in pm.notes) and any("conv_shortcut" in s for s in pm.notes)
    # the QDQ graph: one QuantizeLinear per enabled quantizer, runs on onnxruntime near the torch model
    assert pm.onnx_path is not None and pm.onnx_path.is_file()
    ops = [node.op_type for node in onnx.load(str(pm.onnx_path), load_external_data=False).graph.node]
    assert ops.count("QuantizeLinear") == 2 * n
    assert pm.extra["ort_vs_torch_rel_l2"] < 0.2
    with pytest.raises(RuntimeError):  # the scope assertion catches a mismatch
        modelopt_int8.check_scope(pm.model, modelopt_int8.expected_modules(unet, scope) + ["bogus"])


def test_conv_in_quantized(setup, tmp_path):
    unet, calib, x, t, ref = setup
    scope = Scope(fp_layers=NO_CONV_IN, conv_in_fp=False)
    pm = modelopt_int8.quantize(unet, calib, scope, "max", tmp_path, log=lambda m: None)
    assert pm.extra["enabled_quantizers"] == len(scope.quantized_modules(unet)) == \
        len(Scope(fp_layers=DEFAULT_FP_LAYERS).quantized_modules(unet)) + 1
    assert pm.model.conv_in.input_quantizer.is_enabled
    assert 0 < _rel(pm.model, x, t, ref) < 0.2


def test_percentile_w8a6(setup, tmp_path):
    unet, calib, x, t, ref = setup
    scope = Scope(a_bits=6, fp_layers=DEFAULT_FP_LAYERS)
    pm = modelopt_int8.quantize(unet, calib, scope, "percentile", tmp_path, log=lambda m: None)
    assert pm.extra["enabled_quantizers"] == len(scope.quantized_modules(unet))
    q = pm.model.down_blocks[0].resnets[0].conv1
    assert q.input_quantizer.num_bits == 6 and q.weight_quantizer.num_bits == 8
    assert q.input_quantizer.amax.numel() == 1  # per tensor
    assert pm.onnx_path is None  # ModelOpt's ONNX export is 8-bit only
    assert 0 < _rel(pm.model, x, t, ref) < 0.5
