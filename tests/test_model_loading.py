"""Model loading: every source kind, both UNet classes, and clear errors for bad input."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

from adpdm_export.model_loading import load_model
from engines.errors import AdpdmError
from tiny_models import save_unet_folder, tiny_cond_unet, tiny_unet2d


def test_unet_folder_loads_with_scheduler_and_hash(tmp_path):
    unet = tiny_unet2d()
    save_unet_folder(unet, tmp_path / "u")
    m = load_model(tmp_path / "u")
    assert m.kind == "UNet2DModel"
    assert m.sample_shape == (1, 16, 16)
    assert m.scheduler_config_found and m.num_train_timesteps == 1000
    assert m.conditioning == {}
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(m.unet(x, t).sample, unet(x, t).sample)
    # same weights from a pipeline folder hash the same
    pipe = tmp_path / "p"
    save_unet_folder(unet, pipe / "unet", scheduler=False)
    DDPMScheduler(num_train_timesteps=500).save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    p = load_model(pipe)
    assert p.sha256 == m.sha256
    assert p.num_train_timesteps == 500


def test_changed_weights_change_the_hash(tmp_path):
    a = load_model(save_unet_folder(tiny_unet2d(seed=0), tmp_path / "a"))
    b = load_model(save_unet_folder(tiny_unet2d(seed=1), tmp_path / "b"))
    assert a.sha256 != b.sha256


def test_condition_model_and_class_labels(tmp_path):
    m = load_model(save_unet_folder(tiny_cond_unet(), tmp_path / "c"))
    assert m.kind == "UNet2DConditionModel"
    assert m.conditioning == {"encoder_hidden_states": {"dim": 24}}
    assert m.default_condition(3)["encoder_hidden_states"].shape == (3, 1, 24)
    k = load_model(save_unet_folder(tiny_unet2d(num_class_embeds=10), tmp_path / "k"))
    assert k.default_condition(12)["class_labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_missing_scheduler_falls_back_to_ddpm_defaults(tmp_path):
    m = load_model(save_unet_folder(tiny_unet2d(), tmp_path / "u", scheduler=False))
    assert not m.scheduler_config_found
    assert m.scheduler_config["num_train_timesteps"] == 1000


def test_missing_folder(tmp_path):
    with pytest.raises(AdpdmError, match="no such model folder"):
        load_model(tmp_path / "nope")


def test_wrong_model_type_is_named(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(tmp_path / "vae")
    with pytest.raises(AdpdmError, match="AutoencoderKL"):
        load_model(tmp_path / "vae")


def test_folder_without_config_lists_what_it_holds(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.txt").write_text("hi")
    with pytest.raises(AdpdmError, match="weights.txt"):
        load_model(tmp_path / "x")


def test_corrupted_safetensors(tmp_path):
    folder = save_unet_folder(tiny_unet2d(), tmp_path / "u")
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AdpdmError, match="could not load UNet2DModel"):
        load_model(folder)


def test_pickle_weights_are_refused_not_loaded(tmp_path):
    folder = save_unet_folder(tiny_unet2d(), tmp_path / "u")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(AdpdmError, match="never unpickles"):
        load_model(folder)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdpdmError, match="Hugging Face hub"):
        load_model("google/ddpm-cifar10-32")
