"""build-engine: the stages run once, resume after a deleted output, and the build serves the runner."""

import json

import pytest
import torch

from adpdm_export.build_engine import CalibrationSettings, build_engine
from engines.errors import AdpdmError
from engines.manifest import load_manifest
from engines.runner import TimestepDispatchRunner
from tiny_models import save_unet_folder, tiny_unet2d

FAST = CalibrationSettings(method="uniform-groups", groups=2, calib_samples=4, calib_steps=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("be")
    model = save_unet_folder(tiny_unet2d(), root / "unet")
    summary = build_engine(str(model), root / "build", FAST, backend="ort", cache_dir=str(root / "cache"))
    return model, root, summary


def test_build_writes_a_manifest_that_loads_and_runs(built):
    model, root, summary = built
    m = load_manifest(root / "build")
    assert m.backend == "ort" and m.num_groups == 2
    assert [s.name for s in summary.stages] == ["calibrate", "export"]
    assert not any(s.reused for s in summary.stages)
    runner = TimestepDispatchRunner(root / "build", backend="ort")
    out = runner(torch.randn(3, 1, 16, 16), torch.tensor([10, 900, 400]))
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


def test_second_run_reuses_every_stage(built):
    model, root, _ = built
    again = build_engine(str(model), root / "build", FAST, backend="ort", cache_dir=str(root / "cache"))
    assert all(s.reused for s in again.stages)


def test_resume_reruns_only_the_stage_whose_output_was_deleted(built):
    model, root, _ = built
    (root / "build" / "unet.g1.ort.onnx").unlink()
    calib_before = (root / "build" / "calibration" / "calibration.json").read_bytes()
    again = build_engine(str(model), root / "build", FAST, backend="ort", cache_dir=str(root / "cache"))
    status = {s.name: s.reused for s in again.stages}
    assert status == {"calibrate": True, "export": False}
    assert (root / "build" / "calibration" / "calibration.json").read_bytes() == calib_before
    load_manifest(root / "build")  # verifies every file's hash


def test_changed_settings_recalibrate(built):
    model, root, _ = built
    changed = CalibrationSettings(method="uniform-groups", groups=3, calib_samples=4, calib_steps=8)
    again = build_engine(str(model), root / "build", changed, backend="ort", cache_dir=str(root / "cache"))
    assert not any(s.reused for s in again.stages)
    assert load_manifest(root / "build").num_groups == 3
    assert json.loads((root / "build" / "calibration" / "calibration.json").read_text())["method"] == "uniform-groups"


def test_trt_backend_without_tensorrt_is_one_clear_error(built, tmp_path):
    from engines.platform import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is installed here")
    model, root, _ = built
    with pytest.raises(AdpdmError, match="TensorRT"):
        build_engine(str(model), tmp_path / "b", FAST, backend="trt")
    assert not (tmp_path / "b").exists()
