"""build-engine: the stages run once, resume after a deleted output, rerun when any of their inputs
changes (conditions by value, the model, every flag), and the build serves the runner."""

import json
import shutil
import types

import pytest
import torch

from adpdm_export.build_pipeline import build_engine
from calibration.configs import ADPDMConfig, DataFreeConfig, MinMaxConfig, UniformGroupsConfig
from calibration.qconfig import QuantConfig
from engines.errors import AdpdmError
from engines.manifest import load_manifest
from engines.runner import TimestepDispatchRunner
from tiny_models import save_unet_folder, tiny_cond_unet, tiny_unet2d

FAST = dict(method=UniformGroupsConfig(groups=2), data=DataFreeConfig(samples=4, steps=8))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("be")
    model = save_unet_folder(tiny_unet2d(), root / "unet")
    summary = build_engine(str(model), root / "build", **FAST, backend="ort", cache_dir=str(root / "cache"))
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
    again = build_engine(str(model), root / "build", **FAST, backend="ort", cache_dir=str(root / "cache"))
    assert all(s.reused for s in again.stages)


def test_resume_reruns_only_the_stage_whose_output_was_deleted(built):
    model, root, _ = built
    (root / "build" / "unet.g1.ort.onnx").unlink()
    calib_before = (root / "build" / "calibration" / "calibration.json").read_bytes()
    again = build_engine(str(model), root / "build", **FAST, backend="ort", cache_dir=str(root / "cache"))
    status = {s.name: s.reused for s in again.stages}
    assert status == {"calibrate": True, "export": False}
    assert (root / "build" / "calibration" / "calibration.json").read_bytes() == calib_before
    load_manifest(root / "build")  # verifies every file's hash


def test_changed_settings_recalibrate(built):
    model, root, _ = built
    changed = {**FAST, "method": UniformGroupsConfig(groups=3)}
    again = build_engine(str(model), root / "build", **changed, backend="ort", cache_dir=str(root / "cache"))
    assert not any(s.reused for s in again.stages)
    assert load_manifest(root / "build").num_groups == 3
    assert json.loads((root / "build" / "calibration" / "calibration.json").read_text())["method"] == "uniform-groups"


def test_trt_backend_without_tensorrt_is_one_clear_error(built, tmp_path):
    from engines.platform import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is installed here")
    model, root, _ = built
    with pytest.raises(AdpdmError, match="TensorRT"):
        build_engine(str(model), tmp_path / "b", **FAST, backend="trt")
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------
# every input of a stage is in its key: a rebuild into the same --out after any of them
# changes reruns the stage (and what follows), an identical rebuild reuses it
# ----------------------------------------------------------------------------------------
QUICK = dict(method=UniformGroupsConfig(groups=1), data=DataFreeConfig(samples=2, steps=2))


def labels(*values):
    return {"class_labels": torch.tensor(values, dtype=torch.int64)}


def embeddings(seed):
    return {"encoder_hidden_states": torch.randn(1, 1, 24, generator=torch.Generator().manual_seed(seed))}


def rebuild(model, out, settings=QUICK, **kw):
    """build-engine into `out` (onnxruntime target unless `targets`): ({stage: reused}, say() lines)."""
    lines = []
    kw.setdefault("backend", "ort")
    kw.setdefault("targets", ("ort",))
    summary = build_engine(str(model), out, **{**settings, **kw}, say=lines.append)
    return {s.name: s.reused for s in summary.stages}, lines


REUSED = {"calibrate": True, "export": True}
RERUN = {"calibrate": False, "export": False}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A class-conditional tiny UNet folder and a quick build of it for labels 1, 2."""
    root = tmp_path_factory.mktemp("labelled")
    model = save_unet_folder(tiny_unet2d(num_class_embeds=10), root / "unet")
    status, _ = rebuild(model, root / "build", cond=labels(1, 2))
    assert status == RERUN
    return model, root / "build"


def copy_of(build, tmp_path):
    return shutil.copytree(build, tmp_path / "build")


def test_other_class_labels_recalibrate(labelled, tmp_path):
    model, build = labelled
    out = copy_of(build, tmp_path)
    assert rebuild(model, out, cond=labels(1, 2))[0] == REUSED  # equal values, another tensor
    status, lines = rebuild(model, out, cond=labels(3, 4))  # same shape, other labels
    assert status == RERUN and "calibrate: running" in lines
    for_34 = (out / "calibration" / "calibration.json").read_text()
    assert rebuild(model, out, cond=labels(3, 4))[0] == REUSED
    assert rebuild(model, out, cond=labels(1, 2))[0] == RERUN  # and back
    assert (out / "calibration" / "calibration.json").read_text() != for_34


def test_other_prompt_embeddings_recalibrate(tmp_path):
    model = save_unet_folder(tiny_cond_unet(), tmp_path / "unet")
    assert rebuild(model, tmp_path / "b", cond=embeddings(0))[0] == RERUN
    assert rebuild(model, tmp_path / "b", cond=embeddings(0))[0] == REUSED
    status, lines = rebuild(model, tmp_path / "b", cond=embeddings(1))  # same shape, other values
    assert status == RERUN and "calibrate: running" in lines
    assert rebuild(model, tmp_path / "b", cond=embeddings(1))[0] == REUSED


def _new_weights(folder):
    save_unet_folder(tiny_unet2d(seed=1, num_class_embeds=10), folder)


def _edit_json(name, changes):
    def edit(folder):
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


@pytest.mark.parametrize("change", [
    _new_weights,
    _edit_json("config.json", {"norm_eps": 1e-3}),  # same weights, another model
    _edit_json("scheduler_config.json", {"beta_end": 0.03}),  # same UNet, other trajectories
], ids=["weights", "unet-config", "scheduler-config"])
def test_changed_model_in_the_same_folder_reruns_every_stage(tmp_path, change):
    model = save_unet_folder(tiny_unet2d(num_class_embeds=10), tmp_path / "unet")
    assert rebuild(model, tmp_path / "b", cond=labels(1, 2))[0] == RERUN
    change(model)
    status, lines = rebuild(model, tmp_path / "b", cond=labels(1, 2))
    assert status == RERUN and "calibrate: running" in lines
    assert rebuild(model, tmp_path / "b", cond=labels(1, 2))[0] == REUSED


# One changed value per calibration flag of `adpdm build-engine` (the test below checks every flag
# is listed): each maps to one field of the method, quant or data config, or to seed / device.
FLAG_CHANGES = {
    "method": {"method": MinMaxConfig()},
    "groups": {"method": UniformGroupsConfig(groups=2)},
    "stat": {"method": UniformGroupsConfig(groups=1, stat="percentile")},
    "percentile": {"method": UniformGroupsConfig(groups=1, percentile=99.0)},
    "options": {"method": UniformGroupsConfig(groups=1, percentile=99.5)},  # --option percentile=99.5
    "w_bits": {"quant": QuantConfig(w_bits=4)},
    "a_bits": {"quant": QuantConfig(a_bits=7)},  # calibrates, then the export refuses A7
    "quantize_residual": {"quant": QuantConfig(quantize_residual=True)},
    "quantize_attention_bmm": {"quant": QuantConfig(quantize_attention_bmm=True)},
    "calib_samples": {"data": DataFreeConfig(samples=3, steps=2)},
    "calib_steps": {"data": DataFreeConfig(samples=2, steps=3)},
    "sampling_precision": {"data": DataFreeConfig(samples=2, steps=2, precision="bf16")},
    "seed": {"seed": 1},
    "device": {"device": "cpu:0"},
    # keyed on the budget asked for (not on the probe-timed fit), so the rebuild below is reused
    "calib_budget_minutes": {"calib_budget_minutes": 60.0},
}
NOT_CALIBRATION = {"model", "out", "backend", "batch_sizes", "resolution", "opt_level", "force", "class_labels",
                   "prompt_embeds", "cache_dir", "progress",  # conditions: the tests above
                   "prompts", "negative_prompt", "guidance_scale",  # text pipelines: tests/test_text_pipelines.py
                   "high_precision"}  # an export setting: test_high_precision_reruns_only_the_export


def test_every_calibration_flag_is_tested():
    import inspect

    from adpdm_export.commands.build_engine_cmd import build_engine as command

    flags = set(inspect.signature(command).parameters) - NOT_CALIBRATION
    assert set(FLAG_CHANGES) == flags


@pytest.mark.parametrize("flag", sorted(FLAG_CHANGES))
def test_each_calibration_flag_reruns_calibrate(labelled, tmp_path, flag):
    model, build = labelled
    out = copy_of(build, tmp_path)
    changed = {**QUICK, **FLAG_CHANGES[flag]}
    assert changed != QUICK
    if flag == "a_bits":
        lines = []
        with pytest.raises(AdpdmError, match="A7"):
            build_engine(str(model), out, **changed, backend="ort", targets=("ort",), cond=labels(1, 2),
                         say=lines.append)
        assert "calibrate: running" in lines
        return
    status, lines = rebuild(model, out, changed, cond=labels(1, 2))
    assert status == RERUN and "calibrate: running" in lines
    assert rebuild(model, out, changed, cond=labels(1, 2))[0] == REUSED


def test_other_targets_rerun_only_the_export(labelled, tmp_path):
    model, build = labelled
    out = copy_of(build, tmp_path)
    status, lines = rebuild(model, out, cond=labels(1, 2), targets=("trt", "ort"))
    assert status == {"calibrate": True, "export": False} and "calibrate: running" not in lines
    assert rebuild(model, out, cond=labels(1, 2), targets=("trt", "ort"))[0] == REUSED


def test_adpdm_in_a_build_calibrates_the_weights_once_with_the_pipeline_batch(tmp_path, monkeypatch):
    from calibration import adpdm, pipeline, weight_clipping

    calls = []

    def counted(*a, **k):
        calls.append(1)
        return weight_clipping.calibrate_weights(*a, **k)

    monkeypatch.setattr(pipeline, "calibrate_weights", counted)
    monkeypatch.setattr(adpdm, "calibrate_weights", counted)
    model = save_unet_folder(tiny_unet2d(), tmp_path / "unet")
    method = ADPDMConfig(groups=2, search_iters=2, refine_iters=1, srm_candidates=2, srm_eval_steps=2,
                         srm_heldout_items=1, search_items=3)
    rebuild(model, tmp_path / "b", {"method": method, "data": DataFreeConfig(samples=3, steps=4)})
    assert len(calls) == 1
    doc = json.loads((tmp_path / "b" / "calibration" / "calibration.json").read_text())
    assert doc["extra"]["adpdm"]["config"]["batch_size"] == pipeline.DEFAULT_BATCH_SIZE  # not raised to 256


# ---------------------------------------------------------------- the engines stage, without TensorRT
def _fake_tensorrt(mp, state):
    """TensorRT stand-ins (placeholder engine files, a "trt" manifest) so the engine stage's keys run here."""
    import engines.build
    import engines.platform
    from engines.manifest import write_manifest
    from engines.manifest_schema import TensorrtInfo, TrtOptimizationProfile, with_tensorrt

    def build(out, m, batch_sizes, resolution=None, opt_level=3, on_group=None):
        state["built"] += 1
        names = []
        for g in m.groups:
            (out / f"unet.g{g.id}.plan").write_bytes(b"placeholder %d" % g.id)
            names.append(f"unet.g{g.id}.plan")
        info = TensorrtInfo(tensorrt_version=state["trt"], gpu_name=state["gpu"][0], compute_capability=state["gpu"][1],
                            optimization_profile=TrtOptimizationProfile(batch=(1, 1, 1), height=(16, 16, 16), width=(16, 16, 16)),
                            batch_sizes=sorted(batch_sizes), opt_level=opt_level)
        built = with_tensorrt(m, info, names)
        write_manifest(out, built)
        return built

    mp.setattr(engines.platform, "pick_backend", lambda requested="auto": "trt")
    mp.setattr(engines.platform, "require_tensorrt", lambda: types.SimpleNamespace(__version__=state["trt"]))
    mp.setattr(engines.platform, "gpu_identity", lambda device=None: state["gpu"])
    mp.setattr(engines.build, "build_trt_engines", build)


def _trt_state():
    return {"trt": "10.0.0", "gpu": ("Fake GPU", "9.0"), "built": 0}


@pytest.fixture(scope="module")
def trt_built(labelled, tmp_path_factory):
    model, build = labelled
    out = shutil.copytree(build, tmp_path_factory.mktemp("trt") / "build")
    with pytest.MonkeyPatch.context() as mp:
        _fake_tensorrt(mp, _trt_state())
        status, _ = rebuild(model, out, cond=labels(1, 2), backend="trt", targets=("trt",))
    assert status == {"calibrate": True, "export": False, "engines": False}
    return model, out


ENGINE_CHANGES = {"batch_sizes": {"batch_sizes": (1, 2)}, "resolution": {"resolution": (16, 16)},
                  "opt_level": {"opt_level": 2}, "gpu": {}, "tensorrt": {}}


@pytest.mark.parametrize("what", sorted(ENGINE_CHANGES))
def test_each_engine_setting_reruns_only_the_engines(trt_built, tmp_path, monkeypatch, what):
    model, build = trt_built
    out = copy_of(build, tmp_path)
    state = _trt_state()
    _fake_tensorrt(monkeypatch, state)
    same = dict(cond=labels(1, 2), backend="trt", targets=("trt",))
    assert rebuild(model, out, **same)[0] == {**REUSED, "engines": True}
    if what == "gpu":
        state["gpu"] = ("Other GPU", "8.9")
    if what == "tensorrt":
        state["trt"] = "10.1.0"
    changed = {**same, **ENGINE_CHANGES[what]}
    assert rebuild(model, out, **changed)[0] == {**REUSED, "engines": False}
    assert rebuild(model, out, **changed)[0] == {**REUSED, "engines": True}
    assert state["built"] == 1 and load_manifest(out).backend == "trt"


def test_high_precision_reruns_only_the_export(labelled, tmp_path):
    """--high-precision is in the export stage's key: a change re-exports, the calibration is reused;
    the manifest records the TensorRT target's precision."""
    from engines.manifest import load_manifest

    model, build = labelled
    out = copy_of(build, tmp_path)
    both = ("trt", "ort")
    assert rebuild(model, out, cond=labels(1, 2), targets=both)[0] == {"calibrate": True, "export": False}
    assert load_manifest(out).graph_precision == {"trt": "fp16", "ort": "fp32"}  # the default
    assert rebuild(model, out, cond=labels(1, 2), targets=both, high_precision="fp16")[0] == REUSED
    assert rebuild(model, out, cond=labels(1, 2), targets=both, high_precision="fp32")[0] == {"calibrate": True,
                                                                                               "export": False}
    assert load_manifest(out).graph_precision == {"trt": "fp32", "ort": "fp32"}
    with pytest.raises(AdpdmError, match="TensorRT target only"):
        rebuild(model, out, cond=labels(1, 2), high_precision="bf16")  # the ort target alone
