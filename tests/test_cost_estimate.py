"""The calibration cost estimate counts what calibration does, and the budget scales it down."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from calibration.configs import ADPDMConfig, DataFreeConfig, MinMaxConfig
from calibration.cost_estimate import (
    BUDGET_LEVELS,
    CostEstimate,
    ProbeSeconds,
    count_passes,
    fit_budget,
)
from calibration.pipeline import calibrate
from calibration.qconfig import QuantConfig
from calibration.quant_unet import get_state, is_quantized
from engines.errors import AdpdmError
from tiny_models import save_unet_folder, tiny_unet2d

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
SMALL = ADPDMConfig(groups=2, search_iters=3, refine_iters=2, search_batch=4, srm_candidates=2, srm_eval_steps=2,
                    srm_heldout_items=2, search_items=3)


class PassCounter:
    """Counts UNet item passes by kind (fp / quant / train) from a global forward pre-hook."""

    def __init__(self):
        self.counts = {"fp": 0, "quant": 0, "train": 0}

    def __call__(self, module, args, kwargs=None):
        if not is_quantized(module):
            return None
        st = get_state(module)
        b = int((args[0] if args else kwargs["sample"]).shape[0])
        kind = "train" if torch.is_grad_enabled() else ("quant" if st.act_enabled else "fp")
        self.counts[kind] += b
        return None


def _phase_totals(phases) -> dict[str, int]:
    return {k: sum(getattr(p, k) for p in phases) for k in ("fp", "quant", "train")}


@pytest.mark.parametrize("method, target, guided", [
    (SMALL, "trt", False),
    (dataclasses.replace(SMALL, calib_step="last"), "ort", False),
    (dataclasses.replace(SMALL, partition="search"), "trt", True),
    (MinMaxConfig(), "trt", True),
])
def test_the_count_is_what_calibration_runs(method, target, guided):
    unet = tiny_unet2d(num_class_embeds=3)
    data = DataFreeConfig(samples=6, steps=5, guidance_scale=2.0 if guided else 1.0)
    counter = PassCounter()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(counter)
    try:
        calibrate(unet, SCHEDULER, method, QuantConfig(target=target), data=data, batch_size=4,
                  cond={"class_labels": torch.tensor([1, 2])}, uncond={"class_labels": torch.tensor([0])})
    finally:
        handle.remove()
    assert counter.counts == _phase_totals(count_passes(method, data, batch_size=4, target=target))


def test_guidance_doubles_the_items_and_srm_is_skipped_with_a_fixed_step():
    plain = _phase_totals(count_passes(ADPDMConfig(), DataFreeConfig(samples=8, steps=10)))
    guided = _phase_totals(count_passes(ADPDMConfig(), DataFreeConfig(samples=8, steps=10, guidance_scale=3.0)))
    assert guided["fp"] > plain["fp"]
    assert count_passes(MinMaxConfig(), DataFreeConfig(samples=8, steps=10, guidance_scale=3.0))[0].fp == 160
    assert "srm" in [p.phase for p in count_passes(ADPDMConfig(), DataFreeConfig())]
    assert "srm" not in [p.phase for p in count_passes(ADPDMConfig(calib_step="last"), DataFreeConfig())]
    train = sum(p.train for p in count_passes(ADPDMConfig(), DataFreeConfig()))
    assert train == (100 + 60) * 16


PROBE = ProbeSeconds(fp=1e-3, quant=1.5e-3, train=5e-3)


def test_a_budget_applies_levels_in_order_until_it_fits():
    method, data = ADPDMConfig(), DataFreeConfig()
    full = CostEstimate(count_passes(method, data), PROBE).seconds
    m2, d2, est = fit_budget(method, data, full * 0.6, PROBE)
    assert est.seconds <= full * 0.6 and est.levels
    assert list(est.levels) == [lv.name for lv in BUDGET_LEVELS[:len(est.levels)]]
    assert m2.search_items <= 8 and m2.srm_candidates <= 4  # the first level's caps
    # a generous budget changes nothing
    m3, d3, est3 = fit_budget(method, data, full * 2, PROBE)
    assert (m3, d3, est3.levels) == (method, data, ())
    # settings already below a level's caps are never raised
    small = DataFreeConfig(samples=8, steps=10)
    _, d4, _ = fit_budget(method, small, 1e-3 + CostEstimate(count_passes(method, small), PROBE).seconds, PROBE)
    assert d4 == small


def test_a_budget_too_small_for_every_level_is_one_line_before_any_work():
    with pytest.raises(AdpdmError, match="even at the smallest budget level"):
        fit_budget(ADPDMConfig(), DataFreeConfig(), 0.01, PROBE)
    for bad in (0, -1, float("nan"), float("inf"), "x", True):
        with pytest.raises(AdpdmError, match="positive number of minutes"):
            calibrate(tiny_unet2d(), SCHEDULER, MinMaxConfig(), data=DataFreeConfig(samples=2, steps=2),
                      budget_minutes=bad)


def test_calibrate_reports_the_estimate_and_records_the_fit():
    seen = []
    result = calibrate(tiny_unet2d(), SCHEDULER, SMALL, data=DataFreeConfig(samples=6, steps=5), batch_size=4,
                       on_estimate=seen.append, budget_minutes=60)
    (est,) = seen
    assert est.seconds is not None and est.seconds > 0 and est.probe.train > 0
    assert "UNet item passes" in est.summary()
    settings = result.config["calibration"]
    assert settings["estimate"]["passes"] == est.passes
    assert settings["budget_minutes"] == 60.0


def test_build_engine_prints_the_estimate_and_refuses_a_bad_budget(tmp_path, capsys, monkeypatch):
    from adpdm_export.cli import main

    monkeypatch.setenv("ADPDM_CACHE_DIR", str(tmp_path / "cache"))
    model = save_unet_folder(tiny_unet2d(), tmp_path / "unet")
    out = tmp_path / "build"
    rc = main(["build-engine", str(model), "--out", str(out), "--backend", "ort", "--method", "minmax",
               "--calib-samples", "2", "--calib-steps", "3", "--calib-budget-minutes", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "positive number of minutes" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc = main(["build-engine", str(model), "--out", str(out), "--backend", "ort", "--method", "minmax",
               "--calib-samples", "2", "--calib-steps", "3", "--calib-budget-minutes", "30", "--no-progress"])
    printed = capsys.readouterr().err  # progress and stage lines go to stderr
    assert rc == 0, printed
    assert "calibration estimate: 6 UNet item passes (trajectories 6)" in printed
    settings = json.loads((out / "calibration" / "calibration.json").read_text())["config"]
    assert settings["calibration"]["budget_minutes"] == 30.0


def test_the_probe_leaves_no_weight_gradients_and_skips_the_backward_without_a_search():
    from calibration.cost_estimate import probe_seconds
    from calibration.quant_unet import quantize_model

    qmodel = quantize_model(tiny_unet2d())
    before = {n: p.requires_grad for n, p in qmodel.named_parameters()}

    def example(b):
        return torch.randn(b, 1, 16, 16), torch.randint(0, 1000, (b,)), {}

    probe = probe_seconds(qmodel, example, batch=4, train_batch=4)
    assert probe.train > 0 and probe.fp > 0
    assert all(p.grad is None for p in qmodel.parameters())  # no weight gradient held through calibration
    assert {n: p.requires_grad for n, p in qmodel.named_parameters()} == before
    assert probe_seconds(qmodel, example, batch=4, train_batch=0).train == 0.0


def test_half_precision_sampling_is_its_own_kind_timed_under_autocast():
    data = DataFreeConfig(samples=6, steps=5, precision="bf16")
    phases = count_passes(MinMaxConfig(), data)
    assert (phases[0].phase, phases[0].sample, phases[0].fp) == ("trajectories", 30, 0)
    assert CostEstimate(phases, ProbeSeconds(fp=1.0, quant=2.0, train=3.0, sample=0.25)).seconds == 30 * 0.25
    assert CostEstimate(phases, ProbeSeconds(fp=1.0, quant=2.0, train=3.0)).seconds == 30 * 1.0  # untimed: as FP32
    seen = []
    calibrate(tiny_unet2d(), SCHEDULER, MinMaxConfig(), data=data, on_estimate=seen.append)
    d = seen[0].to_dict()
    assert d["phases"][0]["sample"] == 30 and d["probe_seconds_per_item"]["sample"] > 0
    seen.clear()
    calibrate(tiny_unet2d(), SCHEDULER, MinMaxConfig(), data=dataclasses.replace(data, precision="fp32"),
              on_estimate=seen.append)
    assert "sample" not in seen[0].to_dict()["probe_seconds_per_item"]
