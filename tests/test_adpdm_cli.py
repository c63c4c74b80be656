"""ADP-DM end to end: through `calibration.pipeline.calibrate` on a tiny UNet (fast) and through
`adpdm calibrate reference --method adpdm` with few steps (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler

from calibration import pipeline
from calibration.configs import ADPDMConfig, DataFreeConfig
from calibration.result import CalibrationResult
from tiny_models import tiny_unet2d

FAST = {"search_iters": 8, "refine_iters": 4, "srm_candidates": 3, "srm_eval_steps": 3,
        "srm_heldout_items": 6, "search_items": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrate(seed=0, log=None, **kw):
    unet = tiny_unet2d()
    sc = dict(DDPMScheduler(num_train_timesteps=1000).config)
    config = ADPDMConfig(**{**FAST, "groups": 2, **kw})
    return pipeline.calibrate(unet, sc, config, data=DataFreeConfig(samples=16, steps=6), seed=seed, batch_size=64,
                              log=log)


def test_pipeline_adpdm_result_roundtrip_and_reproducible(tmp_path):
    a = _calibrate()
    assert a.method == "adpdm"
    assert 1 <= a.num_groups <= 2
    assert a.calib_timestep is not None
    assert a.timestep_to_group.shape == (1000,)
    srm = a.extra["adpdm"]["srm"]
    assert len(srm["rows"]) == 3 and {"empirical_risk", "mmd2", "structural_risk", "oracle"} <= set(srm["rows"][0])
    assert a.calib_timestep == srm["tau"]
    # every calibration timestep is listed under its group
    listed = sorted(t for g in a.groups for t in g["calib_timesteps"])
    assert listed == sorted(a.extra["adpdm"]["calib_timesteps"])
    a.save(tmp_path / "c")
    back = CalibrationResult.load(tmp_path / "c")
    assert torch.equal(back.timestep_to_group, a.timestep_to_group)
    assert back.calib_timestep == a.calib_timestep
    b = _calibrate()
    assert torch.equal(a.timestep_to_group, b.timestep_to_group)
    for n, s in a.activation_scales.items():
        assert torch.equal(s, b.activation_scales[n]), n


def test_fixed_calibration_step_skips_srm():
    lines: list[str] = []
    r = _calibrate(calib_step="last", groups=1, log=lines.append)
    assert r.extra["adpdm"]["srm"] is None
    assert r.calib_timestep == min(r.extra["adpdm"]["calib_timesteps"])
    assert r.num_groups == 1
    assert any("loss" in line for line in lines) and "tau* =" in lines[-1]  # losses, then the summary
    assert r.config["calibration"]["method_config"] == {**ADPDMConfig(**FAST, groups=1, calib_step="last").to_dict()}


REFERENCE = os.path.join(os.path.dirname(__file__), "..", "adpdm_export", "assets", "reference", "model_index.json")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(REFERENCE), reason="bundled reference model not built yet")
def test_cli_calibrate_reference_adpdm(tmp_path):
    env = dict(os.environ, ADPDM_CACHE_DIR=str(tmp_path / "cache"))
    options = [a for k, v in FAST.items() for a in ("--option", f"{k}={v}")]
    out = tmp_path / "calib"
    r = subprocess.run(
        [sys.executable, "-m", "adpdm_export.cli", "calibrate", "reference", "--method", "adpdm", "--groups", "2",
         "--calib-samples", "16", "--calib-steps", "8", "--out", str(out), "--no-progress", *options],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "tau* =" in r.stderr and "group 0" in r.stderr and "loss" in r.stderr, r.stderr
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["method"] == "adpdm"
    assert doc["calib_timestep"] is not None
    assert doc["extra"]["adpdm"]["srm"]["rows"]
    cfg = doc["extra"]["adpdm"]["config"]  # the --option values reached the search
    assert cfg["search"]["search_iters"] == FAST["search_iters"] and cfg["srm"]["num_candidates"] == FAST["srm_candidates"]
