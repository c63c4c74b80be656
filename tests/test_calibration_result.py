"""CalibrationResult: JSON + safetensors round trip, schema, hash checks, tampered files."""

from __future__ import annotations

import json

import pytest
import torch

from calibration.configs import DataFreeConfig, UniformGroupsConfig
from calibration.pipeline import calibrate
from calibration.qconfig import QuantConfig
from calibration.quant_unet import activation_scales, quantize_model, weight_scales
from calibration.result import JSON_NAME, TENSORS_NAME, CalibrationResult, groups_from_table
from engines.errors import AdpdmError
from tiny_models import tiny_unet2d


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from conftest import DDPM_CONFIG

    unet = tiny_unet2d()
    cache = tmp_path_factory.mktemp("cache")
    res = calibrate(unet, DDPM_CONFIG, UniformGroupsConfig(groups=3), QuantConfig(w_bits=8, a_bits=8),
                    data=DataFreeConfig(samples=4, steps=6), cache_dir=str(cache))
    return unet, res


def eps(m, x, t):
    with torch.no_grad():
        return m(x, t).sample


def test_round_trip_identical_outputs(calibrated, tmp_path):
    unet, res = calibrated
    q1 = quantize_model(unet, result=res)
    res.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [JSON_NAME, TENSORS_NAME]
    loaded = CalibrationResult.load(tmp_path / "c", expected_model_sha256=res.model_sha256)
    q2 = quantize_model(unet, result=loaded)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 500, 990])
    assert torch.equal(eps(q1, x, t), eps(q2, x, t))
    for a, b in ((activation_scales(q1), activation_scales(q2)), (weight_scales(q1), weight_scales(q2))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.timestep_to_group, res.timestep_to_group)
    assert loaded.groups == res.groups and loaded.config == json.loads(json.dumps(res.config))


def test_schema(calibrated, tmp_path):
    unet, res = calibrated
    res.save(tmp_path)
    doc = json.loads((tmp_path / JSON_NAME).read_text())
    for key in ("format_version", "model_sha256", "method", "w_bits", "a_bits", "profile", "num_train_timesteps",
                "num_groups", "groups", "timestep_to_group", "calib_timestep", "activation_quantizers",
                "weight_quantizers", "config", "timings", "tensors_sha256"):
        assert key in doc, key
    assert len(doc["timestep_to_group"]) == 1000 and doc["num_groups"] == 3
    assert doc["groups"][0]["timestep_ranges"] == [[0, 333]] and doc["groups"][2]["timestep_ranges"] == [[667, 999]]
    covered = sorted(t for g in doc["groups"] for lo, hi in g["timestep_ranges"] for t in range(lo, hi + 1))
    assert covered == list(range(1000))
    assert doc["config"]["quant"]["w_bits"] == 8 and doc["config"]["calibration"]["calib_steps"] == 6
    roles = {q["role"] for q in doc["activation_quantizers"]}
    assert roles == {"input", "output"}
    shared = [q for q in doc["activation_quantizers"] if q["aliases"]]
    assert shared and shared[0]["name"].endswith("to_q.input_quantizer")
    assert res.output_scales and res.input_scales and not set(res.output_scales) & set(res.input_scales)
    assert {"trajectories_s", "activations_s", "weights_s", "total_s"} <= set(doc["timings"])


def test_hash_mismatch(calibrated, tmp_path):
    unet, res = calibrated
    res.save(tmp_path)
    with pytest.raises(AdpdmError, match="not for this model"):
        CalibrationResult.load(tmp_path, expected_model_sha256="0" * 64)
    with pytest.raises(AdpdmError, match="recalibrate"):
        quantize_model(tiny_unet2d(seed=1), result=res)
    q_other = quantize_model(tiny_unet2d(seed=1), QuantConfig(), table=res.timestep_to_group)
    with pytest.raises(AdpdmError, match="recalibrate"):
        res.apply(q_other)


def test_truncated_or_modified_files(calibrated, tmp_path):
    unet, res = calibrated
    res.save(tmp_path)
    data = (tmp_path / TENSORS_NAME).read_bytes()
    (tmp_path / TENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdpdmError, match="truncated or modified"):
        CalibrationResult.load(tmp_path)
    # a truncated file without the recorded hash still fails cleanly
    doc = json.loads((tmp_path / JSON_NAME).read_text())
    doc["tensors_sha256"] = ""
    (tmp_path / JSON_NAME).write_text(json.dumps(doc))
    with pytest.raises(AdpdmError, match="cannot read"):
        CalibrationResult.load(tmp_path)
    (tmp_path / JSON_NAME).write_text("{not json")
    with pytest.raises(AdpdmError, match="not valid JSON"):
        CalibrationResult.load(tmp_path)
    (tmp_path / JSON_NAME).unlink()
    with pytest.raises(AdpdmError, match="calibrate"):
        CalibrationResult.load(tmp_path)
    with pytest.raises(AdpdmError, match="no calibration folder"):
        CalibrationResult.load(tmp_path / "missing")


def test_version_and_config_mismatch(calibrated, tmp_path):
    unet, res = calibrated
    res.save(tmp_path)
    doc = json.loads((tmp_path / JSON_NAME).read_text())
    doc["format_version"] = 99
    (tmp_path / JSON_NAME).write_text(json.dumps(doc))
    with pytest.raises(AdpdmError, match="format_version"):
        CalibrationResult.load(tmp_path)
    q = quantize_model(unet, QuantConfig(quantize_attention_bmm=True), table=res.timestep_to_group)
    with pytest.raises(AdpdmError, match="quantization config changed"):
        res.apply(q)
    q4 = quantize_model(unet, QuantConfig(w_bits=4), table=res.timestep_to_group)
    with pytest.raises(AdpdmError, match="W4A8"):
        res.apply(q4)


def test_groups_from_table():
    table = torch.tensor([0, 0, 1, 1, 0, 2])
    assert groups_from_table(table, {1: [3, 2]}) == [
        {"id": 0, "timestep_ranges": [[0, 1], [4, 4]], "calib_timesteps": []},
        {"id": 1, "timestep_ranges": [[2, 3]], "calib_timesteps": [2, 3]},
        {"id": 2, "timestep_ranges": [[5, 5]], "calib_timesteps": []},
    ]


def test_old_style_file_loads_and_resaves_byte_identical(tmp_path):
    """calibration.json as written before the graph target was renamed ("profile" at the top and in
    config.quant) loads into `target`, and saving it again writes the same bytes."""
    from safetensors.torch import save_file

    from calibration.result import FORMAT, _dumps
    from engines.file_io import sha256_file

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    tensors = {"timestep_to_group": torch.tensor([0, 0, 1, 1]), "conv.input_quantizer.scale": torch.tensor([0.5, 0.25]),
               "conv.weight_quantizer.scale": torch.tensor([0.1, 0.2, 0.3])}
    save_file(tensors, str(old / TENSORS_NAME), metadata={"format": FORMAT})
    quant = {"w_bits": 8, "a_bits": 8, "profile": "ort", "fp_layers": ["conv_in"], "quantize_residual": False,
             "quantize_attention_bmm": False, "share_qkv_input": True, "weight_clip_search": True,
             "weight_clip_grid": 80, "weight_clip_min": 0.3}
    doc = {  # the key order of the writer
        "format": FORMAT, "format_version": 1, "model_sha256": "ab" * 32, "method": "uniform-groups",
        "w_bits": 8, "a_bits": 8, "profile": "ort", "num_train_timesteps": 4, "num_groups": 2,
        "groups": [{"id": 0, "timestep_ranges": [[0, 1]], "calib_timesteps": [1]},
                   {"id": 1, "timestep_ranges": [[2, 3]], "calib_timesteps": [3]}],
        "timestep_to_group": [0, 0, 1, 1], "calib_timestep": None,
        "activation_quantizers": [{"name": "conv.input_quantizer", "role": "input", "layer": "conv", "aliases": []}],
        "weight_quantizers": [{"name": "conv.weight_quantizer", "layer": "conv", "channels": 3}],
        "config": {"quant": quant, "calibration": {"calib_steps": 2}}, "timings": {"total_s": 1.5}, "extra": {},
        "tensors_file": TENSORS_NAME, "tensors_sha256": sha256_file(old / TENSORS_NAME),
    }
    text = _dumps(doc) + "\n"
    (old / JSON_NAME).write_text(text)

    res = CalibrationResult.load(old)
    assert res.target == "ort" and not hasattr(res, "profile")
    cfg = QuantConfig.from_dict(res.config["quant"])
    assert cfg.target == "ort" and cfg.to_dict() == quant and list(cfg.to_dict()) == list(quant)
    res.save(new)
    assert (new / JSON_NAME).read_text() == text
    assert (new / TENSORS_NAME).read_bytes() == (old / TENSORS_NAME).read_bytes()


def test_quant_config_dict_names():
    """to_dict writes the graph target under its on-disk key "profile"; from_dict takes either name."""
    assert QuantConfig(target="ort").to_dict()["profile"] == "ort" and "target" not in QuantConfig().to_dict()
    assert QuantConfig.from_dict({"profile": "ort"}).target == "ort"
    assert QuantConfig.from_dict({"target": "ort"}).target == "ort"
    assert QuantConfig.from_dict({"target": "ort", "profile": "ort"}).target == "ort"
    with pytest.raises(AdpdmError, match="both target 'ort' and profile 'trt'"):
        QuantConfig.from_dict({"target": "ort", "profile": "trt"})
    with pytest.raises(AdpdmError, match="target must be one of trt, ort"):
        QuantConfig.from_dict({"profile": "tflite"})
