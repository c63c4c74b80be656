"""SDXL-layout pipelines (issue 15): a UNet with added conditions (`text_embeds`, `time_ids`) from
loading through calibration, export, the runner, `adpdm sample --prompt` and the diffusers drop-ins.

Tiny random pipelines written by tests/tiny_models.py (save_sdxl_pipeline, save_text_pipeline).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import adpdm_export as adpdm
from adpdm_export.cli import main
from engines.manifest import load_manifest
from engines.sampler import initial_noise
from tiny_models import save_sdxl_pipeline, save_text_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a handwritten seven"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def loaded(pipe):
    return adpdm.load_model(str(pipe))


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def build(pipe, tmp_path_factory):
    """A two-group build on the onnxruntime CPU target, calibrated with prompts and guidance (the CLI)."""
    root = tmp_path_factory.mktemp("sdxl-build")
    prompts = root / "prompts.txt"
    prompts.write_text("a handwritten seven\nthe digit three\n")
    out = root / "build"
    rc = main([str(a) for a in ("build-engine", pipe, "--out", out, "--backend", "ort", "--method", "uniform-groups",
                                "--groups", 2, "--calib-samples", 2, "--calib-steps", 4, "--prompts", prompts,
                                "--guidance-scale", 3, "--no-progress")])
    assert rc == 0
    return out


def _diffusers_pipe(pipe_folder, cls_name):
    import diffusers

    return getattr(diffusers, cls_name).from_pretrained(str(pipe_folder)).to("cpu")


# ------------------------------------------------------------------ loading


def test_an_sdxl_pipeline_loads_both_encoders_as_diffusers_encodes(pipe, loaded, tmp_path):
    assert loaded.conditioning == {"encoder_hidden_states": {"dim": 24, "sequence_length": 8},
                                   "text_embeds": {"dim": 16},
                                   "time_ids": {"dim": 6, "default": [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]}}
    te = loaded.text_encoder
    assert type(te).__name__ == "SdxlTextEncoders" and te.force_zeros_for_empty_prompt
    cond, truncated = te.conditions([PROMPT, "the digit three"])
    assert truncated == [] and cond["encoder_hidden_states"].shape == (2, 8, 24)
    assert cond["text_embeds"].shape == (2, 16) and cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    sd = _diffusers_pipe(pipe, "StableDiffusionXLPipeline")
    pe, npe, pooled, npooled = sd.encode_prompt([PROMPT, "the digit three"], device="cpu",
                                                do_classifier_free_guidance=True)
    assert torch.equal(pe, cond["encoder_hidden_states"]) and torch.equal(pooled, cond["text_embeds"])
    # no negative prompt + force_zeros_for_empty_prompt: zeros, as the pipeline and the null condition
    null = loaded.default_condition(3)
    assert npe.abs().max() == 0 and null["encoder_hidden_states"].abs().max() == 0 and null["text_embeds"].abs().max() == 0
    assert null["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 3
    neg, cut = te.negative_conditions("a photo of a cat")
    assert cut is False
    _, npe, _, npooled = sd.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True,
                                          negative_prompt="a photo of a cat")
    assert torch.equal(npe, neg["encoder_hidden_states"]) and torch.equal(npooled, neg["text_embeds"])
    # a pipeline that does not force zeros encodes the empty prompt
    other = save_sdxl_pipeline(tmp_path / "nozeros", force_zeros_for_empty_prompt=False)
    m = adpdm.load_model(str(other))
    _, npe, _, npooled = _diffusers_pipe(other, "StableDiffusionXLPipeline").encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=True)
    got = m.default_condition(1)
    assert npe.abs().max() > 0 and torch.equal(got["encoder_hidden_states"], npe) and torch.equal(got["text_embeds"], npooled)
    # the time ids are what the pipeline builds for its default size
    ids = sd._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=16)
    assert ids.tolist() == cond["time_ids"][:1].tolist()


def test_a_bare_sdxl_unet_folder_gets_the_sdxl_vae_time_ids(tmp_path):
    from tiny_models import save_unet_folder, tiny_sdxl_unet

    m = adpdm.load_model(str(save_unet_folder(tiny_sdxl_unet(), tmp_path / "unet")))
    assert m.conditioning["time_ids"] == {"dim": 6, "default": [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]}  # 16 x 8
    assert m.text_encoder is None and set(m.default_condition(2)) == {"encoder_hidden_states", "text_embeds", "time_ids"}


def test_sdxl_pipelines_that_do_not_fit_are_one_line(pipe, tmp_path):
    wide = save_sdxl_pipeline(tmp_path / "wide", widths=(8, 24))  # the UNet is built for 8 + 24 = 32: consistent
    assert adpdm.load_model(str(wide)).conditioning["encoder_hidden_states"]["dim"] == 32
    mixed = Path(shutil.copytree(pipe, tmp_path / "mixed"))
    shutil.rmtree(mixed / "text_encoder_2")
    shutil.copytree(wide / "text_encoder_2", mixed / "text_encoder_2")
    with pytest.raises(adpdm.AdpdmError, match="8 \\+ 24 = 32-wide embeddings, the UNet's cross-attention takes 24"):
        adpdm.load_model(str(mixed))
    proj = save_sdxl_pipeline(tmp_path / "proj", pooled_dim=12)
    shutil.rmtree(proj / "unet")
    shutil.copytree(pipe / "unet", proj / "unet")
    with pytest.raises(adpdm.AdpdmError, match="projects to 12, the UNet's added embedding takes 16-wide text_embeds"):
        adpdm.load_model(str(proj))
    missing = Path(shutil.copytree(pipe, tmp_path / "missing"))
    shutil.rmtree(missing / "tokenizer_2")
    with pytest.raises(adpdm.AdpdmError, match="lacks tokenizer_2/ \\(an SDXL pipeline needs"):
        adpdm.load_model(str(missing))
    other = Path(shutil.copytree(pipe / "unet", tmp_path / "image-unet"))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "image"}))
    with pytest.raises(adpdm.AdpdmError, match="addition_embed_type='image' is not supported"):
        adpdm.load_model(str(other))


# ------------------------------------------------------------------ calibration


def test_calibration_with_prompts_sees_the_added_conditions(loaded):
    data = adpdm.DataFreeConfig(samples=2, steps=3, guidance_scale=4.0)
    result = adpdm.calibrate(loaded, adpdm.MinMaxConfig(), data=data, prompts=[PROMPT, "the digit zero"])
    settings = result.config["calibration"]
    assert settings["cond_keys"] == ["encoder_hidden_states", "text_embeds", "time_ids"]
    assert settings["calib_items"] == 4 and settings["guidance_scale"] == 4.0
    # the cross-attention K/V see both encoders' real embeddings, not a collapsed all-zero one
    kv = [n for n in result.activation_scales if "attn2.to_k" in n]
    assert kv and all(float(result.activation_scales[n].min()) > 1e-4 for n in kv)


def test_calibrate_cli_with_prompts_on_an_sdxl_pipeline(pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\nthe digit three\n")
    rc, err = run_cli(capsys, "calibrate", pipe, "--out", tmp_path / "c", "--method", "minmax", "--calib-samples", 2,
                      "--calib-steps", 2, "--prompts", prompts, "--negative-prompt", "a cat", "--no-progress")
    assert rc == 0, err
    settings = json.loads((tmp_path / "c" / "calibration.json").read_text())["config"]["calibration"]
    assert settings["cond_keys"] == ["encoder_hidden_states", "text_embeds", "time_ids"]
    assert (settings["calib_samples"], settings["calib_items"], settings["guidance_scale"]) == (2, 4, 7.5)


# ------------------------------------------------------------------ the build and the runner


def test_the_build_declares_and_takes_the_added_conditions(build, loaded):
    m = load_manifest(build)
    assert m.model.conditioning == loaded.conditioning
    assert json.loads((build / "manifest.json").read_text())["model"]["conditioning"]["time_ids"]["dim"] == 6
    import onnx

    for k in range(m.num_groups):
        graph = onnx.load(str(build / m.groups[k].graphs["ort"]), load_external_data=False)
        dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert dims["text_embeds"] == ["batch", 16] and dims["time_ids"] == ["batch", 6]
    from adpdm_export.qdq_report import report_from_disk

    report = report_from_disk(json.loads((build / "qdq_report.json").read_text()))
    checks = {(c["target"], c["group"]): c for c in report["checks"]}  # parity per group and target, with them fed
    assert set(checks) == {(p, k) for p in ("trt", "ort") for k in range(2)}
    from adpdm_export.qdq_parity import parity_tolerance

    # the TensorRT target is FP16 outside the INT8 layers by default (16 FP16 eps); the CPU target FP32 (1e-3)
    assert m.graph_precision.get("trt") == "fp16"
    for (target, k), c in checks.items():
        tol = parity_tolerance(m.graph_precision.get(target, "fp32"))
        assert c["forced_rel_l2"] <= tol and c["fp_rel_l2"] < 0.5, (target, k, c["forced_rel_l2"])
    assert report["one_session"]["status"] == "ok"  # the shared graph takes them too, checked against the groups
    assert m.ort_one_session is not None


def _items(loaded, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond, _ = loaded.text_encoder.conditions([PROMPT, "the digit three", "a cat", "the digit zero"][:n])
    cond["time_ids"] = cond["time_ids"] + torch.arange(n, dtype=torch.float32)[:, None]  # each item its own
    return torch.randn(n, 4, 16, 16, generator=g), cond


@pytest.mark.parametrize("sessions", ["one", "per-group"])
def test_a_batch_that_mixes_groups_keeps_item_order(build, loaded, sessions):
    runner = adpdm.Runner(build, ort_options={"sessions": sessions})
    x, cond = _items(loaded, 4)
    t = torch.tensor([10, 900, 20, 800])
    assert runner.group_of(t).unique().numel() == 2
    out = runner(x, t, **cond)
    for i in range(4):
        alone = runner(x[i:i + 1], t[i:i + 1], **{k: v[i:i + 1] for k, v in cond.items()})
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    other = runner(x, t, **{**cond, "time_ids": cond["time_ids"].flip(0)})
    assert (other - out).abs().max() > 1e-4  # the time ids reach the graph


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("text_embeds"), r"missing conditioning input\(s\) \['text_embeds'\]"),
    (lambda c: [c.pop("text_embeds"), c.pop("time_ids")], r"missing conditioning input\(s\) \['text_embeds', 'time_ids'\]"),
    (lambda c: c.update(text_embeds=torch.zeros(2, 15)), r"text_embeds must be \(batch=2, 16\), got \(2, 15\)"),
    (lambda c: c.update(time_ids=torch.zeros(2, 5)), r"time_ids must be \(batch=2, 6\), got \(2, 5\)"),
    (lambda c: c.update(time_ids=torch.zeros(2, 6, dtype=torch.int64)), "time_ids must be float32"),
    (lambda c: c.update(text_embeds=torch.full((2, 16), float("nan"))), "text_embeds contains NaN or inf"),
])
def test_bad_added_conditions_are_one_line(build, loaded, change, message):
    runner = adpdm.Runner(build)
    x, cond = _items(loaded, 2)
    change(cond)
    with pytest.raises(adpdm.AdpdmError, match=message) as e:
        runner(x, torch.tensor([10, 900]), **cond)
    assert "\n" not in str(e.value)


def test_the_adapter_refuses_added_conditions_the_build_lacks(build, loaded, tmp_path):
    unet = adpdm.Runner(build).as_unet()
    x, cond = _items(loaded, 2)
    with pytest.raises(adpdm.AdpdmError, match=r"missing conditioning input\(s\) \['text_embeds', 'time_ids'\]"):
        unet(x, 10, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=None)
    with pytest.raises(adpdm.AdpdmError, match=r"added_cond_kwargs \['image_embeds'\] are not supported"):
        unet(x, 10, encoder_hidden_states=cond["encoder_hidden_states"],
             added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"], "image_embeds": x})


def test_trt_profiles_cover_the_added_conditions():
    from engines.manifest_schema import TrtOptimizationProfile
    from engines.trt_builder import optimization_profile_shapes

    op = TrtOptimizationProfile(batch=(1, 2, 4), height=(16, 16, 16), width=(16, 16, 16))
    spec = {"encoder_hidden_states": {"dim": 24, "sequence_length": 8}, "text_embeds": {"dim": 16},
            "time_ids": {"dim": 6}}
    shapes = optimization_profile_shapes(["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
                                         4, op, spec)
    assert shapes["text_embeds"] == ((1, 16), (2, 16), (4, 16)) and shapes["time_ids"] == ((1, 6), (2, 6), (4, 6))


def test_manifest_round_trip_and_inconsistent_added_conditions(build, tmp_path):
    from engines.manifest import write_manifest

    m = load_manifest(build)
    copy = Path(shutil.copytree(build, tmp_path / "copy"))
    write_manifest(copy, m, extra_files=["qdq_report.json"])
    assert load_manifest(copy).model.conditioning == m.model.conditioning
    raw = json.loads((copy / "manifest.json").read_text())
    for bad, message in (
        ({k: v for k, v in raw["model"]["conditioning"].items() if k != "time_ids"}, "go together"),
        ({**raw["model"]["conditioning"], "text_embeds": {}}, "text_embeds needs 'dim'"),
        ({**raw["model"]["conditioning"], "time_ids": {"dim": 6, "default": [1, 2]}}, "time_ids.default must be 6"),
    ):
        (copy / "manifest.json").write_text(json.dumps({**raw, "model": {**raw["model"], "conditioning": bad}}))
        with pytest.raises(adpdm.AdpdmError, match=message):
            load_manifest(copy, verify=False)


# ------------------------------------------------------------------ sampling and the drop-ins


def _grid(path):
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.int16)


def test_sample_with_a_prompt_from_the_sdxl_pipeline_and_its_build(pipe, build, tmp_path, capsys):
    common = ["--n", 2, "--steps", 3, "--scale", 1, "--prompt", PROMPT]
    rc, err = run_cli(capsys, "sample", pipe, "--out", tmp_path / "fp.png", *common)
    assert rc == 0, err
    rc, err = run_cli(capsys, "sample", build, "--out", tmp_path / "q.png", *common)
    assert rc == 0, err
    assert _grid(tmp_path / "q.png").shape == _grid(tmp_path / "fp.png").shape == (32 + 2, 2 * 32 + 3)
    rc, err = run_cli(capsys, "sample", build, "--out", tmp_path / "q2.png", *common[:-1], "the digit three")
    assert rc == 0 and (_grid(tmp_path / "q2.png") != _grid(tmp_path / "q.png")).any()  # the prompt matters
    rc, err = run_cli(capsys, "sample", build, "--out", tmp_path / "null.png", *common[:-2])  # the spec's defaults
    assert rc == 0, err


def _drop_in_matches_adpdm_sample(pipe_folder, build, cls_name, tmp_path, capsys, **call):
    """`pipe.unet = runner.as_unet()` in the diffusers pipeline vs `adpdm sample BUILD --prompt` (same
    prompt, seed, steps, guidance; the pipeline gets the CLI's seeded noise as `latents=`)."""
    from engines.images import save_grid
    from engines.scheduling import make_scheduler

    n, steps, seed, guidance = 2, 4, 3, 3.0
    rc, err = run_cli(capsys, "sample", build, "--prompt", PROMPT, "--guidance-scale", guidance, "--n", n, "--steps",
                      steps, "--seed", seed, "--scale", 1, "--out", tmp_path / "cli.png")
    assert rc == 0, err
    runner = adpdm.Runner(build)
    sd = _diffusers_pipe(pipe_folder, cls_name)
    sd.unet = runner.as_unet()
    sd.scheduler = make_scheduler(runner.manifest.scheduler, "ddim")  # the CLI's default sampler
    latents = initial_noise(n, runner.sample_shape, seed)
    size = runner.sample_shape[1] * sd.vae_scale_factor
    images = sd(PROMPT, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                height=size, width=size, output_type="pt", **call).images
    save_grid(images * 2 - 1, tmp_path / "pipe.png")
    diff = np.abs(_grid(tmp_path / "pipe.png") - _grid(tmp_path / "cli.png"))
    assert diff.max() <= 1, f"max grey-level difference {diff.max()}"  # rounding of the same float images
    assert 0 < float(images.std())  # not a blank image
    # before the VAE: the pipeline's latents are the sampler's (measured bit-identical; the tolerance
    # allows for onnxruntime batching the two halves differently)
    from adpdm_export.sampling import generate, text_to_image_parts
    from calibration.trajectories import expand_cond

    enc = text_to_image_parts(str(build)).text_encoder
    ours = generate(runner, runner.manifest.scheduler, runner.sample_shape, n, steps, seed,
                    cond=expand_cond(enc.conditions([PROMPT])[0], n), guidance_scale=guidance,
                    uncond=expand_cond(enc.negative_conditions(None)[0], n)).images
    theirs = sd(PROMPT, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                height=size, width=size, output_type="latent", **call).images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_sdxl_drop_in_matches_adpdm_sample(pipe, build, tmp_path, capsys):
    _drop_in_matches_adpdm_sample(pipe, build, "StableDiffusionXLPipeline", tmp_path, capsys)


def test_sd_drop_in_matches_adpdm_sample(tmp_path, capsys):
    sd_pipe = save_text_pipeline(tmp_path / "sd", clip_sample=False)  # SD pipelines step DDIM without clipping
    build = tmp_path / "sd-build"
    adpdm.build_engine(str(sd_pipe), build, adpdm.MinMaxConfig(), data=adpdm.DataFreeConfig(samples=2, steps=2),
                       backend="ort", targets=("ort",))
    _drop_in_matches_adpdm_sample(sd_pipe, build, "StableDiffusionPipeline", tmp_path, capsys)


def test_the_tensorrt_target_is_fp16_outside_the_int8_layers_and_lints_clean(build, capsys):
    """Issue 15: the TensorRT-target export of an SDXL-layout UNet with the default high precision
    (FP16) passes the linter (`lint_model` and `adpdm lint`) with FP16 outside the INT8 layers: every
    Conv, Gemm/MatMul and Softmax computes in FP16, the graph I/O (the added conditions included) stays
    FP32, and the sinusoids of both the timestep and the time ids are FP32 islands."""
    import onnx
    from onnx import TensorProto

    from adpdm_export import high_precision as HP
    from adpdm_export.qdq_lint import lint_model

    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    m = load_manifest(build)
    assert m.graph_precision["trt"] == "fp16"
    for g in m.groups:
        path = build / g.graphs["trt"]
        assert lint_model(path, high_precision="fp16") == []
        assert lint_model(path, high_precision="fp32")  # the rule does look at the types: not an FP32 graph
        model = onnx.load(str(path))
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        t = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.graph.value_info, *model.graph.input,
                                                                *model.graph.output]}
        t.update({i.name: i.data_type for i in model.graph.initializer})
        assert all(t[n] == F32 for n in ("sample", "encoder_hidden_states", "text_embeds", "time_ids", "out_sample"))
        compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "Softmax")]
        islands = HP.fp32_islands(model)
        island_outputs = {o for k in islands for o in model.graph.node[k].output}
        assert compute and all(t[n.output[0]] == F16 for n in compute if n.output[0] not in island_outputs)
        assert sum(t[n.output[0]] == F16 for n in compute) > 0.8 * len(compute)
        sinusoids = [k for k, n in enumerate(model.graph.node) if n.op_type in ("Sin", "Cos")]
        assert len(sinusoids) >= 4 and all(k in islands for k in sinusoids)  # timestep + time ids, sin and cos
        rc, err = run_cli(capsys, "lint", path, "--high-precision", "fp16")
        assert rc == 0, err
