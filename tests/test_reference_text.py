"""The bundled text-conditional reference model `reference-text` (tools/train_reference_text.py):
loading by name, its shipped prompts and guidance, and an end-to-end build + prompted sample."""

from __future__ import annotations

import json

import pytest
import torch

import adpdm_export as adpdm
from adpdm_export.cli import main
from adpdm_export.model_loading import BUNDLED_MODELS, REFERENCE_TEXT_DIR, absolute_source, bundled_folder
from adpdm_export.text_prompts import default_guidance_scale, default_prompts, read_prompts
from calibration.prompt_fidelity import digits_of_prompts

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (REFERENCE_TEXT_DIR / "model_index.json").is_file(),
                       reason="bundled reference-text model not built yet (tools/train_reference_text.py)"),
]


@pytest.fixture(scope="module")
def model():
    return adpdm.load_model("reference-text")


def test_loads_by_name_as_a_latent_text_pipeline(model):
    assert model.source == "reference-text" and model.kind == "UNet2DConditionModel"
    assert model.text_encoder is not None and model.text_encoder.folder == REFERENCE_TEXT_DIR
    assert model.sample_shape == (4, 8, 8)
    assert bundled_folder("reference-text") == REFERENCE_TEXT_DIR and bundled_folder("reference") == BUNDLED_MODELS["reference"]
    assert bundled_folder("./reference-text") is None and absolute_source("reference-text") == "reference-text"
    from adpdm_export.sampling import text_to_image_parts

    parts = text_to_image_parts("reference-text")
    assert parts.decoder.decode(torch.zeros(2, *model.sample_shape)).shape == (2, 1, 16, 16)  # the classifier's input


def test_ships_its_prompts_guidance_and_only_safetensors():
    heldout, train = default_prompts(REFERENCE_TEXT_DIR), read_prompts(REFERENCE_TEXT_DIR / "prompts_train.txt")
    assert heldout == read_prompts(REFERENCE_TEXT_DIR / "prompts_heldout.txt")  # the default calibration prompts
    assert not set(heldout) & set(train)  # held out: never a training phrasing
    assert sorted(set(digits_of_prompts(heldout))) == list(range(10)) == sorted(set(digits_of_prompts(train)))
    assert digits_of_prompts(heldout[:10]) == list(range(10))  # any 10 seeds in turn see every digit
    settings = json.loads((REFERENCE_TEXT_DIR / "adpdm.json").read_text())
    assert default_guidance_scale(REFERENCE_TEXT_DIR) == settings["guidance_scale"] >= 1.0
    files = [p for p in REFERENCE_TEXT_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) < 15_000_000


@pytest.mark.slow
def test_build_engine_on_ort_and_sample_with_a_prompt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADPDM_CACHE_DIR", str(tmp_path / "cache"))
    build = tmp_path / "build"
    rc = main(["build-engine", "reference-text", "--out", str(build), "--backend", "ort", "--method", "minmax",
               "--calib-samples", "4", "--calib-steps", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    manifest = adpdm.Runner(build).manifest
    assert manifest.model.source == "reference-text"  # a name, found again from any directory
    settings = json.loads((build / "calibration" / "calibration.json").read_text())["config"]["calibration"]
    assert settings["guidance_scale"] == default_guidance_scale(REFERENCE_TEXT_DIR)
    rc = main(["sample", str(build), "--prompt", "a handwritten seven", "--n", "2", "--steps", "4", "--scale", "1",
               "--out", str(tmp_path / "q.png")])
    assert rc == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(tmp_path / "q.png").size == (2 * 16 + 3, 16 + 2)  # VAE-decoded 16x16 digits
