"""`adpdm export-triton`: model repository layout, config.pbtxt parsed by Triton's ModelConfig, and the
`generate` Python-backend model run against a stand-in for triton_python_backend_utils (BLS calls
served by onnxruntime on the exported group graphs), compared with the in-process sampling loop."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.errors import AdpdmError
from engines.manifest import load_manifest
from engines.manifest_schema import TensorrtInfo, TrtOptimizationProfile
from engines_fixtures import make_build

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="config validation needs tritonclient[grpc]")

from engines.triton_repository import (  # noqa: E402
    IOSpec,
    group_model_config,
    validate_config,
    validate_repository,
    write_repository,
)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trepo") / "build"
    make_build(folder, num_groups=3, conditioning={"class_labels": {"num_classes": 10}})
    return folder


def _trt_manifest(build: Path, tmp: Path):
    """The build as if it had TensorRT engines (dummy plan files): enough to write the repository."""
    dst = tmp / "trt_build"
    shutil.copytree(build, dst)
    m = load_manifest(dst, verify=False)
    for g in m.groups:
        (dst / f"unet.g{g.id}.plan").write_bytes(b"plan" + bytes([g.id]))
    groups = [replace(g, engine=f"unet.g{g.id}.plan") for g in m.groups]
    trt = TensorrtInfo("10.0", "H100", "9.0", TrtOptimizationProfile((1, 4, 8), (16, 16, 16), (16, 16, 16)), [1, 4, 8], 3,
                       graph_target="ort")
    return replace(m, groups=groups, backend="trt", tensorrt=trt, root=dst)


def test_tensorrt_repository(build, tmp_path):
    m = _trt_manifest(build, tmp_path)
    repo = write_repository(m, tmp_path / "repo", platform="tensorrt", cuda_graphs=True)
    cfgs = validate_repository(repo)
    assert sorted(cfgs) == ["generate", "unet_g0", "unet_g1", "unet_g2"]
    for k in range(3):
        c = cfgs[f"unet_g{k}"]
        assert c.platform == "tensorrt_plan" and c.max_batch_size == 8
        assert [i.name for i in c.input] == ["sample", "timestep", "class_labels"]
        assert list(c.input[0].dims) == [1, 16, 16]
        assert list(c.input[1].dims) == [1] and list(c.input[1].reshape.shape) == []  # (batch,) tensor
        assert c.instance_group[0].kind == c.instance_group[0].KIND_GPU
        assert c.optimization.cuda.graphs
        assert (repo / f"unet_g{k}" / "1" / "model.plan").read_bytes() == b"plan" + bytes([k])
    g = cfgs["generate"]
    assert g.backend == "python" and g.max_batch_size == 0
    assert {i.name: i.optional for i in g.input} == {"seed": False, "n": False, "steps": False, "scheduler": True,
                                                     "class_labels": True}
    meta = json.loads((repo / "generate" / "1" / "adpdm_generate.json").read_text())
    assert meta["timestep_to_group"] == m.timestep_to_group and meta["scheduler"] == m.scheduler


def test_tensorrt_needs_engines_and_out_is_not_overwritten(build, tmp_path):
    with pytest.raises(AdpdmError, match="no TensorRT engines"):
        write_repository(build, tmp_path / "r1", platform="tensorrt")
    (tmp_path / "r2").mkdir()
    with pytest.raises(AdpdmError, match="exists: pass --overwrite"):
        write_repository(build, tmp_path / "r2", platform="onnxruntime")
    m = _trt_manifest(build, tmp_path)
    with pytest.raises(AdpdmError, match="above the engines' largest batch"):
        write_repository(m, tmp_path / "r3", max_batch=9)
    for bad in (0, -3):  # 0 used to become the default (16) silently
        with pytest.raises(AdpdmError, match=f"--max-batch must be >= 1, got {bad}"):
            write_repository(build, tmp_path / "r4", platform="onnxruntime", max_batch=bad)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(AdpdmError, match="afile is a file, not a folder"):
        write_repository(build, tmp_path / "afile" / "repo", platform="onnxruntime")
    assert not (tmp_path / "r4").exists()


def test_bad_configs_are_refused():
    ok = group_model_config("unet_g0", [IOSpec("sample", "TYPE_FP32", (1, 16, 16)), IOSpec("timestep", "TYPE_INT64", ())],
                            [IOSpec("out_sample", "TYPE_FP32", (1, 16, 16))], 4)
    validate_config(ok, "unet_g0")
    with pytest.raises(AdpdmError, match="not the folder name"):
        validate_config(ok, "unet_g1")
    with pytest.raises(AdpdmError, match="does not parse"):
        validate_config(ok.replace("max_batch_size", "max_batch"), "unet_g0")
    with pytest.raises(AdpdmError, match="KIND_GPU"):
        validate_config(ok.replace("KIND_GPU", "KIND_CPU"), "unet_g0")


def _fake_pb_utils(repo: Path):
    """A stand-in for Triton's triton_python_backend_utils: BLS requests run the group's ONNX graph."""
    import onnxruntime as ort

    sessions = {}

    class Tensor:
        def __init__(self, name, arr):
            self._name, self._arr = name, np.asarray(arr)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._arr

    class Response:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self._error = output_tensors or [], error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class TritonError:
        def __init__(self, msg):
            self._msg = msg

        def message(self):
            return self._msg

    class InferenceRequest:
        calls: list = []

        def __init__(self, model_name, requested_output_names, inputs):
            self.model_name, self.inputs = model_name, inputs

        def exec(self):
            InferenceRequest.calls.append((self.model_name, int(self.inputs[1].as_numpy().shape[0])))
            if self.model_name not in sessions:
                sessions[self.model_name] = ort.InferenceSession(str(repo / self.model_name / "1" / "model.onnx"),
                                                                 providers=["CPUExecutionProvider"])
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            feeds = {k: (v.reshape(-1) if k in ("timestep", "class_labels") else v) for k, v in feeds.items()}
            (y,) = sessions[self.model_name].run(["out_sample"], feeds)
            return Response([Tensor("out_sample", y)])

    def get_input_tensor_by_name(req, name):
        return req.get(name)

    def get_output_tensor_by_name(resp, name):
        return next(t for t in resp.output_tensors if t.name() == name)

    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceResponse, mod.TritonError = Tensor, Response, TritonError
    mod.InferenceRequest = InferenceRequest
    mod.get_input_tensor_by_name, mod.get_output_tensor_by_name = get_input_tensor_by_name, get_output_tensor_by_name
    return mod


def test_generate_model_dispatches_each_step_by_timestep(build, tmp_path, monkeypatch):
    from engines.runner import TimestepDispatchRunner
    from engines.serving import generate_images

    repo = write_repository(build, tmp_path / "repo", platform="onnxruntime", max_batch=2,
                            limits={"max_n": 4, "max_steps": 20})
    cfgs = validate_repository(repo)
    assert cfgs["unet_g0"].platform == "onnxruntime_onnx"
    pb = _fake_pb_utils(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("adpdm_generate_model", repo / "generate" / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "generate"), "model_version": "1"})

    def req(**kw):
        return {k: pb.Tensor(k, np.asarray(v)) for k, v in kw.items()}

    good = req(seed=[3], n=[3], steps=[5], class_labels=[7])
    bad = req(seed=[3], n=[9], steps=[5], class_labels=[7])
    r_good, r_bad = model.execute([good, bad])
    assert r_bad.has_error() and "n must be in [1, 4]" in r_bad.error().message()
    assert not r_good.has_error()
    images = r_good.output_tensors[0].as_numpy()
    with TimestepDispatchRunner(build, backend="ort", threads=1) as runner:
        ref = generate_images(runner, 3, 3, 5, cond={"class_labels": torch.full((3,), 7)}).numpy()
    np.testing.assert_allclose(images, ref, atol=1e-5)
    calls = pb.InferenceRequest.calls
    assert len(calls) == 10 and {b for _, b in calls} == {2, 1}  # 5 steps x (2 + 1): max_batch 2
    assert len({m for m, _ in calls}) >= 2  # the steps crossed group boundaries


def _generate_model(repo: Path, monkeypatch):
    """The repository's generate model.py, initialized against the stand-in for pb_utils."""
    pb = _fake_pb_utils(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("adpdm_generate_model", repo / "generate" / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "generate"), "model_version": "1"})
    return model, pb


def test_a_text_build_repository_takes_prompts_with_its_own_copy_of_the_pipeline(tmp_path, monkeypatch):
    """export-triton of a text build: the generate config names the copied tokenizer/text encoder/VAE,
    validate_repository checks them, and generate answers a prompt as `adpdm serve` does (the
    pipeline folder moved away: the repository does not depend on it)."""
    from engines.conditioning import default_condition
    from engines.runner import TimestepDispatchRunner
    from engines.serving import generate_images
    from engines.text_pipeline import PromptRequest, guided_conditions, load_text_pipeline
    from tiny_models import save_text_pipeline, tiny_cond_unet

    pipe = save_text_pipeline(tmp_path / "pipe")
    (pipe / "text_encoder" / "pytorch_model.bin").write_bytes(b"never copied")
    build = tmp_path / "build"
    make_build(build, num_groups=3, conditioning={"encoder_hidden_states": {"dim": 24, "sequence_length": 8}},
               unet=tiny_cond_unet(), offsets=[0.0, 0.05, 0.1], source=str(pipe))
    repo = write_repository(build, tmp_path / "repo", platform="onnxruntime", max_batch=2,
                            limits={"max_n": 4, "max_steps": 20})
    cfgs = validate_repository(repo)
    gen = cfgs["generate"]
    assert {"prompt", "negative_prompt", "guidance_scale", "encoder_hidden_states"} <= {t.name for t in gen.input}
    assert {t.name: list(t.dims) for t in gen.output} == {"images": [-1, 1, 32, 32], "notes": [1]}  # VAE pixels
    meta = json.loads((repo / "generate" / "1" / "adpdm_generate.json").read_text())
    assert meta["text_pipeline"] == {"folder": "pipeline", "copied_from": str(pipe), "image_shape": [1, 32, 32]}
    copied = repo / "generate" / "1" / "pipeline"
    assert sorted(p.name for p in copied.iterdir()) == ["model_index.json", "text_encoder", "tokenizer", "vae"]
    assert not (copied / "text_encoder" / "pytorch_model.bin").exists()  # pickles stay behind

    moved = Path(shutil.move(str(pipe), tmp_path / "moved"))
    model, pb = _generate_model(repo, monkeypatch)

    def req(**kw):
        return {k: pb.Tensor(k, np.asarray(v, dtype=np.object_ if isinstance(v[0], bytes) else None))
                for k, v in kw.items()}

    good = req(seed=[3], n=[2], steps=[4], prompt=[b"a handwritten seven"], negative_prompt=[b"a photo of a cat"],
               guidance_scale=np.array([3.0]))
    empty = req(seed=[3], n=[1], steps=[4], prompt=[b""])
    both = req(seed=[3], n=[1], steps=[4], prompt=[b"a cat"], encoder_hidden_states=np.zeros((1, 8, 24), np.float32))
    r_good, r_empty, r_both = model.execute([good, empty, both])
    assert r_empty.has_error() and r_empty.error().message() == "the prompt is empty: give the text to generate from"
    assert r_both.has_error() and "not both" in r_both.error().message()
    assert not r_good.has_error()
    images = r_good.output_tensors[0].as_numpy()
    text = load_text_pipeline(moved, {"encoder_hidden_states": {"dim": 24}})
    with TimestepDispatchRunner(build, backend="ort", threads=1) as runner:
        g = guided_conditions(text.text_encoder, PromptRequest("a handwritten seven", "a photo of a cat", 3.0), 2,
                              default_condition(runner.manifest.model.conditioning, 2))
        ref = generate_images(runner, 3, 2, 4, "ddim", g.cond, 3.0, g.uncond, text.decode).numpy()
    assert images.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(images, ref, atol=1e-5)
    assert {b for _, b in pb.InferenceRequest.calls} == {2}  # 2n = 4 items a step, in chunks of max_batch 2

    shutil.rmtree(copied / "text_encoder")
    with pytest.raises(AdpdmError, match="lacks text_encoder/"):
        validate_repository(repo)


def test_a_prompt_to_a_class_build_repository_is_one_line(build, tmp_path, monkeypatch):
    repo = write_repository(build, tmp_path / "repo", platform="onnxruntime", limits={"max_n": 4, "max_steps": 20})
    assert "text_pipeline" not in json.loads((repo / "generate" / "1" / "adpdm_generate.json").read_text())
    model, pb = _generate_model(repo, monkeypatch)
    (resp,) = model.execute([{k: pb.Tensor(k, np.asarray(v)) for k, v in
                              dict(seed=[0], n=[1], steps=[2], class_labels=[1],
                                   prompt=np.array([b"a cat"], np.object_)).items()}])
    assert resp.has_error() and resp.error().message().startswith("prompt given, but this repository's generate")


def test_export_triton_cli(build, tmp_path):
    from adpdm_export.cli import main

    out = tmp_path / "repo"
    assert main(["export-triton", str(build), "--out", str(out), "--platform", "onnxruntime"]) == 0
    assert sorted(validate_repository(out)) == ["generate", "unet_g0", "unet_g1", "unet_g2"]
    assert main(["export-triton", str(build), "--out", str(out)]) == 2  # no engines, and out exists


# --------------------------------------------------------------------------- --out and --overwrite (issue 17)
def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _cli(capsys, *argv) -> tuple[int, str]:
    """Run `adpdm` in-process: (exit status, the single stderr line)."""
    from adpdm_export.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) <= 1, lines
    return rc, (lines[0] if lines else "")


@pytest.fixture
def build_in_parent(build, tmp_path):
    """A copy of the build inside a parent folder that holds an unrelated file too."""
    parent = tmp_path / "parent"
    src = shutil.copytree(build, parent / "build")
    (parent / "unrelated.txt").write_text("not ours")
    return parent, src


def test_overwrite_refuses_the_source_build(build_in_parent, capsys):
    parent, src = build_in_parent
    before = _snapshot(parent)
    rc, line = _cli(capsys, "export-triton", src, "--out", src, "--platform", "onnxruntime", "--overwrite")
    assert rc == 2 and line == f"error: --out {src} is the build folder or holds it: choose a new folder for the repository"
    assert _snapshot(parent) == before


def test_overwrite_refuses_a_folder_that_holds_the_build(build_in_parent, capsys):
    parent, src = build_in_parent
    before = _snapshot(parent.parent)
    rc, line = _cli(capsys, "export-triton", src, "--out", parent, "--platform", "onnxruntime", "--overwrite")
    assert rc == 2 and line == f"error: --out {parent} is the build folder or holds it: choose a new folder for the repository"
    assert _snapshot(parent.parent) == before


def test_overwrite_refuses_a_folder_that_is_not_our_repository(build, tmp_path, capsys):
    out = tmp_path / "models"
    (out / "my_model" / "1").mkdir(parents=True)
    (out / "my_model" / "config.pbtxt").write_text('name: "my_model"\n')
    before = _snapshot(tmp_path)
    rc, line = _cli(capsys, "export-triton", build, "--out", out, "--platform", "onnxruntime", "--overwrite")
    assert rc == 2 and line.startswith(f"error: --out {out} exists and is not a model repository written by export-triton")
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_our_own_repository_only(build, tmp_path, capsys):
    from engines.triton_repository import REPOSITORY_MARKER, is_our_repository

    out = tmp_path / "repo"
    (tmp_path / "beside.txt").write_text("unrelated")
    assert _cli(capsys, "export-triton", build, "--out", out, "--platform", "onnxruntime") == (0, "")
    assert is_our_repository(out) and (out / REPOSITORY_MARKER).is_file()
    (out / "unet_g0" / "stale.txt").write_text("from the old repository")
    rc, line = _cli(capsys, "export-triton", build, "--out", out, "--platform", "onnxruntime")
    assert rc == 2 and line == f"error: {out} exists: pass --overwrite to replace it"
    rc, line = _cli(capsys, "export-triton", build, "--out", out, "--platform", "onnxruntime", "--overwrite",
                    "--max-batch", "3")
    assert (rc, line) == (0, "")
    assert validate_repository(out)["unet_g0"].max_batch_size == 3 and not (out / "unet_g0" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside.txt", "repo"]  # no temporary folder left
    assert (tmp_path / "beside.txt").read_text() == "unrelated"
