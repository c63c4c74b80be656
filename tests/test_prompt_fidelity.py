"""Prompt fidelity (calibration/prompt_fidelity.py), per-model prompt and guidance defaults, and
`adpdm eval` on guided (classifier-free guidance) calibrations of text pipelines (issue 14)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import adpdm_export as adpdm
from adpdm_export.cli import main
from adpdm_export.text_prompts import (DEFAULT_GUIDANCE_SCALE, DEFAULT_PROMPTS_FILE, default_guidance_scale,
                                       calibration_conditions, default_prompts, read_prompts)
from calibration.metrics import evaluate, sample_like
from calibration.prompt_fidelity import compare_fidelity, digit_of_prompt, fidelity_from_probs, prompt_fidelity
from calibration.trajectories import generate_trajectories
from tiny_models import save_text_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("prompt, digit", [
    ("a handwritten seven", 7), ("the digit 7", 7), ("zero", 0), ("Nine!", 9), ("an image of a 3", 3),
    ("eight, an eight", 8),
])
def test_the_digit_a_prompt_names(prompt, digit):
    assert digit_of_prompt(prompt) == digit


@pytest.mark.parametrize("prompt, message", [
    ("a cat", "names no digit"), ("seventeen", "names no digit"), ("a seven and a 1", "several digits"),
    ("the digit 12", "names the number 12"),
])
def test_prompts_without_one_digit_are_refused(prompt, message):
    with pytest.raises(adpdm.AdpdmError, match=message):
        digit_of_prompt(prompt)


def test_fidelity_from_known_probabilities():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    r = fidelity_from_probs(probs, [0, 1, 1, 2], seeds=[10, 11, 12, 13])
    assert r["prompt_fidelity"] == pytest.approx(0.75)  # item 2 asked for 1, reads as 0
    assert r["prompt_prob_min"] == pytest.approx(0.3) and r["prompt_prob_min_seed"] == 12
    assert r["prompt_prob_median"] == pytest.approx(torch.tensor([0.9, 0.7, 0.3, 0.8]).double().median().item())
    assert r["prompt_fidelity_per_digit"] == [1.0, 0.5, 1.0]
    with pytest.raises(adpdm.AdpdmError, match="4 asked digits"):
        fidelity_from_probs(probs[:3], [0, 1, 1, 2])
    with pytest.raises(adpdm.AdpdmError, match="must lie in 0..2"):
        fidelity_from_probs(probs, [0, 1, 1, 3])


class BrightnessClassifier(torch.nn.Module):
    """A fake classifier that reads the digit from the mean brightness: mean -1 -> 0, ..., +1 -> 9."""

    def forward(self, x):
        level = (x.flatten(1).mean(1) + 1) / 2 * 9
        return -((level[:, None] - torch.arange(10.0)[None]) ** 2) * 10


def flat(levels):
    return torch.stack([torch.full((1, 4, 4), lv / 9 * 2 - 1) for lv in levels])


def test_prompt_fidelity_and_comparison_with_a_fake_classifier():
    clf = BrightnessClassifier()
    images = flat([7, 3, 3, 0])
    r = prompt_fidelity(clf, images, [7, 3, 5, 0])
    assert r["prompt_fidelity"] == pytest.approx(0.75) and r["prompt_fidelity_per_digit"][5] == 0.0
    assert r["prompt_fidelity_per_digit"][1] is None  # never asked
    c = compare_fidelity(clf, flat([7, 3, 4, 1]), images, [7, 3, 5, 0], seeds=[0, 1, 2, 3])
    assert c["prompt_fidelity"] == pytest.approx(0.5) and c["prompt_fidelity_fp"] == pytest.approx(0.75)
    assert c["prompt_fidelity_delta"] == pytest.approx(-0.25)
    assert c["prompt_agreement"] == pytest.approx(0.5)  # items 2 and 3 changed digit


@pytest.fixture(scope="module")
def digits_pipe(tmp_path_factory):
    """A tiny text pipeline whose VAE gives 16x16 1-channel images (the digits classifier's input),
    with its own defaults: held-out prompts and guidance 3."""
    folder = save_text_pipeline(tmp_path_factory.mktemp("t2i") / "pipe", vae_blocks=1)
    (folder / "heldout.txt").write_text("a handwritten seven\nthe digit three\nzero\n")
    (folder / "adpdm.json").write_text(json.dumps({"guidance_scale": 3.0, "prompts": "heldout.txt"}))
    return folder


def test_a_pipeline_folders_own_prompts_and_guidance_are_the_defaults(digits_pipe, tmp_path):
    assert default_prompts(digits_pipe) == ["a handwritten seven", "the digit three", "zero"]
    assert default_guidance_scale(digits_pipe) == 3.0
    assert default_prompts(None) == read_prompts(DEFAULT_PROMPTS_FILE)
    assert default_guidance_scale(tmp_path) == DEFAULT_GUIDANCE_SCALE  # no adpdm.json
    loaded = adpdm.load_model(str(digits_pipe))
    pc = calibration_conditions(loaded, 3)
    assert pc.guidance_scale == 3.0 and pc.cond["encoder_hidden_states"].shape[0] == 3
    assert torch.equal(pc.cond["encoder_hidden_states"], loaded.text_encoder.encode(default_prompts(digits_pipe))[0])
    for bad, message in [({"guidance_scale": 0.5}, "guidance scale must be"), ({"guidance_scale": "7"}, "must be a number"),
                         ({"prompts": "../x.txt"}, "inside the folder"), ([1], "JSON object")]:
        (tmp_path / "adpdm.json").write_text(json.dumps(bad))
        with pytest.raises(adpdm.AdpdmError, match=message):
            default_guidance_scale(tmp_path)


def test_guided_held_out_samples_are_what_the_fp_model_sampled(digits_pipe):
    loaded = adpdm.load_model(str(digits_pipe))
    pc = calibration_conditions(loaded, 3)
    traj = generate_trajectories(loaded.unet, loaded.scheduler_config, num_samples=3, num_steps=3, seed=5,
                                 cond=pc.cond, guidance_scale=pc.guidance_scale, uncond=pc.uncond)
    assert traj.guided and traj.num_samples == 6
    assert torch.equal(sample_like(loaded.unet, loaded.scheduler_config, traj), traj.final)
    again = sample_like(loaded.unet, loaded.scheduler_config, traj, batch_size=2)  # other batches: last bits may differ
    assert torch.allclose(again, traj.final, atol=1e-4)
    unguided = generate_trajectories(loaded.unet, loaded.scheduler_config, num_samples=3, num_steps=3, seed=5,
                                     cond=pc.cond)
    assert (unguided.final - traj.final).abs().max() > 0.01  # guidance matters, so the check above means something
    m = evaluate(loaded.unet, loaded.scheduler_config, traj, classifier=BrightnessClassifier(), labels=[7, 3, 0],
                 decode=lambda z: z[:, :1].clamp(-1, 1))
    assert m["psnr_vs_fp_db_min"] > 80 and m["prompt_agreement"] == 1.0 and m["prompt_fidelity_delta"] == 0.0
    assert m["num_seeds"] == 3 and m["noise_rel_l2_median"] < 1e-5


def test_eval_of_a_guided_calibration_reports_prompt_fidelity(digits_pipe, tmp_path, capsys):
    out = tmp_path / "calib"
    assert main(["calibrate", str(digits_pipe), "--out", str(out), "--method", "minmax", "--calib-samples", "2",
                 "--calib-steps", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    settings = json.loads((out / "calibration.json").read_text())["config"]["calibration"]
    assert settings["guidance_scale"] == 3.0  # the pipeline's own default
    capsys.readouterr()
    rc = main(["eval", str(out), "--json", "--samples", "3", "--steps", "2", "--no-progress",
               "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads(captured.out)
    assert m["guidance_scale"] == 3.0 and m["num_seeds"] == 3 and m["num_samples"] == 6
    assert 0.0 <= m["prompt_fidelity"] <= 1.0 and m["prompt_fidelity_samples"] == 3
    assert math.isfinite(m["fd"]) and math.isfinite(m["psnr_vs_fp_db_median"])
    (tmp_path / "cats.txt").write_text("a photo of a cat\n")
    rc = main(["eval", str(out), "--json", "--samples", "2", "--steps", "2", "--no-progress", "--prompts",
               str(tmp_path / "cats.txt"), "--cache-dir", str(tmp_path / "cache")])
    m = json.loads(capsys.readouterr().out)
    assert rc == 0 and "prompt_fidelity" not in m and "names no digit" in m["prompt_note"]
