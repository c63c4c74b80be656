"""Text-to-image pipeline folders: the pipeline's own tokenizer and text encoder, prompts and
classifier-free guidance in the calibration data (issue 14, its first part: calibration)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import adpdm_export as adpdm
from adpdm_export.cli import main
from engines.sampler import initial_noise, sample
from engines.scheduling import make_scheduler
from engines.torch_predictor import TorchNoisePredictor
from tiny_models import save_text_pipeline, tiny_cond_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return save_text_pipeline(tmp_path_factory.mktemp("t2i") / "pipe")


@pytest.fixture(scope="module")
def loaded(pipe):
    return adpdm.load_model(str(pipe))


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_a_pipeline_folder_loads_its_text_encoder(loaded):
    te = loaded.text_encoder
    assert te is not None and te.max_length == 8 and te.hidden_size == 24
    assert loaded.conditioning["encoder_hidden_states"] == {"dim": 24, "sequence_length": 8}
    embeds, truncated = te.encode(["a handwritten seven", "the digit three"])
    assert embeds.shape == (2, 8, 24) and truncated == []
    assert not torch.equal(embeds[0], embeds[1])  # the prompt matters
    null = loaded.default_condition(3)["encoder_hidden_states"]
    assert null.shape == (3, 8, 24) and torch.equal(null[0], te.encode([""])[0][0])  # the empty prompt, not zeros
    assert null.abs().sum() > 0
    _, truncated = te.encode(["a photo of a cat a photo of a cat a photo of a cat"])
    assert truncated == [0]


def test_guided_sampling_is_classifier_free_guidance():
    unet = tiny_cond_unet()
    p = TorchNoisePredictor(unet)
    sched = make_scheduler({"num_train_timesteps": 1000}, "ddim")
    c = {"encoder_hidden_states": torch.randn(1, 4, 24, generator=torch.Generator().manual_seed(0))}
    u = {"encoder_hidden_states": torch.zeros(1, 4, 24)}
    noise = initial_noise(1, (4, 16, 16), 0)
    out = sample(p, sched, noise, 3, cond=c, guidance_scale=4.0, uncond=u, keep_trajectory=True)
    tr = out.trajectory
    assert tr.x_t.shape[1] == 2 and torch.equal(tr.x_t[:, 0], tr.x_t[:, 1])  # both halves see the same latent
    t0 = torch.full((1,), int(tr.timesteps[0]))
    e_u = p(tr.x_t[0, :1], t0, **u)
    e_c = p(tr.x_t[0, :1], t0, **c)
    torch.testing.assert_close(tr.eps[0, 0:1], e_u, rtol=1e-4, atol=1e-5)  # each half's own output is kept
    torch.testing.assert_close(tr.eps[0, 1:2], e_c, rtol=1e-4, atol=1e-5)
    plain = sample(p, make_scheduler({"num_train_timesteps": 1000}, "ddim"), noise, 3, cond=c).images
    assert (out.images - plain).abs().max() > 1e-3  # guidance changes the sample
    with pytest.raises(adpdm.AdpdmError, match="needs the unconditional inputs"):
        sample(p, sched, noise, 3, cond=c, guidance_scale=4.0)
    for bad in (0.5, float("nan"), "x"):
        with pytest.raises(adpdm.AdpdmError, match="guidance scale must be"):
            sample(p, sched, noise, 3, cond=c, guidance_scale=bad, uncond=u)


def test_calibration_with_prompts_sees_both_halves(loaded):
    data = adpdm.DataFreeConfig(samples=3, steps=4, guidance_scale=5.0)
    result = adpdm.calibrate(loaded, adpdm.UniformGroupsConfig(groups=2), data=data,
                             prompts=["a handwritten seven", "the digit zero"], negative_prompt="a photo of a cat")
    settings = result.config["calibration"]
    assert settings["guidance_scale"] == 5.0 and settings["calib_samples"] == 3
    assert settings["calib_items"] == 6  # 3 seeds x 2 halves
    assert settings["cond_keys"] == ["encoder_hidden_states"]
    unguided = adpdm.calibrate(loaded, adpdm.UniformGroupsConfig(groups=2), data=adpdm.DataFreeConfig(samples=3, steps=4),
                               prompts=["a handwritten seven", "the digit zero"])
    assert unguided.config["calibration"]["calib_samples"] == 3
    # the cross-attention K/V inputs see real embeddings, not a collapsed all-zero one
    kv = [n for n in result.activation_scales if "attn2.to_k" in n]
    assert kv and all(float(result.activation_scales[n].min()) > 1e-4 for n in kv)


def test_prompt_flags_through_the_cli(pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit three\n")
    out = tmp_path / "calib"
    rc, err = run_cli(capsys, "calibrate", pipe, "--out", out, "--method", "minmax", "--calib-samples", 2,
                      "--calib-steps", 2, "--prompts", prompts, "--guidance-scale", 3, "--no-progress")
    assert rc == 0, err
    settings = json.loads((out / "calibration.json").read_text())["config"]["calibration"]
    assert settings["guidance_scale"] == 3.0 and (settings["calib_samples"], settings["calib_items"]) == (2, 4)


@pytest.mark.parametrize("args, message", [
    (["--prompts", "EMPTY"], "holds no prompts"),
    (["--prompts", "MISSING"], "no such prompt file"),
    (["--guidance-scale", "0.5"], "guidance scale must be a number from 1"),
    (["--guidance-scale", "nan"], "guidance scale must be a number from 1"),
])
def test_bad_prompt_flags_are_one_line(pipe, tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").write_text("\n \n")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    rc, err = run_cli(capsys, "calibrate", pipe, "--out", tmp_path / "c", "--method", "minmax", "--calib-samples", 2,
                      "--calib-steps", 2, "--no-progress", *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and message in lines[-1] and len([ln for ln in lines if ln.startswith("error:")]) == 1
    assert not (tmp_path / "c").exists()


def test_prompts_for_a_model_without_a_text_encoder_are_refused(tmp_path, capsys):
    from tiny_models import save_unet_folder

    folder = save_unet_folder(tiny_cond_unet(), tmp_path / "unet")
    rc, err = run_cli(capsys, "calibrate", folder, "--out", tmp_path / "c", "--method", "minmax", "--no-progress",
                      "--guidance-scale", "3")
    assert rc == 2 and "need(s) a text-to-image pipeline folder" in err


def test_a_text_encoder_of_another_width_or_in_pickles_is_one_line(pipe, tmp_path):
    other = save_text_pipeline(tmp_path / "wide", text_width=32)  # the UNet's cross-attention takes 24
    with pytest.raises(adpdm.AdpdmError, match="32-wide embeddings, the UNet's cross-attention takes 24"):
        adpdm.load_model(str(other))
    pickled = Path(shutil.copytree(pipe, tmp_path / "pickled"))
    for f in (pickled / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(adpdm.AdpdmError, match="only pickle weights"):
        adpdm.load_model(str(pickled))
    missing = Path(shutil.copytree(pipe, tmp_path / "missing"))
    shutil.rmtree(missing / "tokenizer")
    with pytest.raises(adpdm.AdpdmError, match="lacks tokenizer/"):
        adpdm.load_model(str(missing))


def test_guidance_and_negative_prompt_are_in_the_build_key(pipe, tmp_path):
    def build(**kw):
        lines = []
        adpdm.build_engine(str(pipe), tmp_path / "b", adpdm.MinMaxConfig(), backend="ort", targets=("ort",),
                           say=lines.append, **kw)
        return "calibrate: running" in lines

    loaded = adpdm.load_model(str(pipe))
    cond = {"encoder_hidden_states": loaded.text_encoder.encode(["the digit three"])[0]}
    neg = {"encoder_hidden_states": loaded.text_encoder.encode([""])[0]}
    other_neg = {"encoder_hidden_states": loaded.text_encoder.encode(["a cat"])[0]}
    guided = adpdm.DataFreeConfig(samples=2, steps=2, guidance_scale=3.0)
    assert build(data=guided, cond=cond, uncond=neg)
    assert not build(data=guided, cond=cond, uncond=neg)  # same: reused
    assert build(data=guided, cond=cond, uncond=other_neg)  # another negative prompt
    assert build(data=adpdm.DataFreeConfig(samples=2, steps=2, guidance_scale=4.0), cond=cond, uncond=other_neg)


def _grid(path):
    from PIL import Image
    import numpy as np

    return np.asarray(Image.open(path))


def test_sample_with_a_prompt_from_the_pipeline_and_from_its_build(pipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the build records the pipeline's absolute path
    common = ["--n", 2, "--steps", 3, "--scale", 1]
    rc, err = run_cli(capsys, "sample", pipe, "--prompt", "a handwritten seven", "--out", tmp_path / "fp.png", *common)
    assert rc == 0, err
    assert _grid(tmp_path / "fp.png").shape == (32 + 2, 2 * 32 + 3)  # VAE-decoded 32x32 images, 1 px gaps
    rc, err = run_cli(capsys, "sample", pipe, "--prompt", "a handwritten seven", "--guidance-scale", 1,
                      "--out", tmp_path / "fp1.png", *common)
    assert rc == 0 and (_grid(tmp_path / "fp.png") != _grid(tmp_path / "fp1.png")).any()  # guidance matters
    build = tmp_path / "build"
    adpdm.build_engine(str(pipe), build, adpdm.MinMaxConfig(), data=adpdm.DataFreeConfig(samples=2, steps=2),
                       backend="ort", targets=("ort",))
    assert Path(adpdm.Runner(build).manifest.model.source).is_absolute()
    rc, err = run_cli(capsys, "sample", build, "--prompt", "a handwritten seven", "--out", tmp_path / "q.png", *common)
    assert rc == 0, err
    assert _grid(tmp_path / "q.png").shape == _grid(tmp_path / "fp.png").shape


@pytest.mark.parametrize("args, message", [
    (["--guidance-scale", "3"], "go with --prompt"),
    (["--prompt", "a cat", "--guidance-scale", "0.5"], "guidance scale must be a number from 1"),
    (["--prompt", " "], "the prompt is empty"),  # the servers' rule too (engines.text_pipeline.PromptRequest)
])
def test_bad_sample_prompt_flags(pipe, tmp_path, capsys, args, message):
    rc, err = run_cli(capsys, "sample", pipe, "--n", 1, "--steps", 2, "--out", tmp_path / "x.png", *args)
    assert rc == 2 and message in err and not (tmp_path / "x.png").exists()


def test_prompt_to_an_unconditional_model_is_one_line(tmp_path, capsys):
    from tiny_models import save_unet_folder, tiny_unet2d

    folder = save_unet_folder(tiny_unet2d(), tmp_path / "unet")
    rc, err = run_cli(capsys, "sample", folder, "--prompt", "a cat", "--n", 1, "--out", tmp_path / "x.png")
    assert rc == 2 and "needs a text-to-image pipeline folder" in err


def test_build_engine_takes_prompts_like_calibrate(pipe, tmp_path):
    """adpdm.build_engine(prompts=, negative_prompt=, guidance_scale=): the conditions of
    text_prompts.calibration_conditions, the function adpdm.calibrate and the CLI use."""
    from adpdm_export.text_prompts import calibration_conditions

    out = tmp_path / "b"
    adpdm.build_engine(str(pipe), out, adpdm.MinMaxConfig(), data=adpdm.DataFreeConfig(samples=2, steps=2),
                       prompts=["the digit three"], negative_prompt="a cat", guidance_scale=3.0, backend="ort",
                       targets=("ort",))
    settings = json.loads((out / "calibration" / "calibration.json").read_text())["config"]["calibration"]
    assert settings["guidance_scale"] == 3.0 and (settings["calib_samples"], settings["calib_items"]) == (2, 4)
    loaded = adpdm.load_model(str(pipe))
    c = calibration_conditions(loaded, 2, prompts=["the digit three"], negative_prompt="a cat", guidance_scale=3.0)
    assert torch.equal(c.cond["encoder_hidden_states"], loaded.text_encoder.encode(["the digit three"])[0])
    assert torch.equal(c.uncond["encoder_hidden_states"], loaded.text_encoder.encode(["a cat"])[0])
    assert calibration_conditions(loaded, 2, guidance_scale=1.0).uncond is None  # no guidance, no negative half
    with pytest.raises(adpdm.AdpdmError, match="give it once"):
        adpdm.build_engine(str(pipe), tmp_path / "c", data=adpdm.DataFreeConfig(guidance_scale=2.0), guidance_scale=3.0)
    with pytest.raises(adpdm.AdpdmError, match="give prompts or prompt embeddings"):
        calibration_conditions(loaded, 2, prompts=["a cat"], cond={"encoder_hidden_states": c.cond["encoder_hidden_states"]})


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), 2e6, "x", True])
def test_one_guidance_rule_for_configs_and_the_sampler(bad):
    from engines.sampler import check_guidance

    message = r"guidance scale must be a number from 1 \(no guidance\) to 1e\+06"
    with pytest.raises(adpdm.AdpdmError, match=message):
        check_guidance(bad)
    with pytest.raises(adpdm.AdpdmError, match=message):
        adpdm.DataFreeConfig(guidance_scale=bad)
    assert adpdm.DataFreeConfig(guidance_scale=1e6).guidance_scale == 1e6
