"""Baselines (minmax, percentile, uniform-groups, per-step): scales, errors by bit width."""

from __future__ import annotations

import pytest
import torch

from calibration.metrics import noise_rel_l2
from calibration.configs import (ADPDMConfig, DataFreeConfig, MinMaxConfig, PercentileConfig, PerStepConfig,
                                 UniformGroupsConfig, method_config)
from calibration.pipeline import METHODS, calibrate, register_method, resolve_device
from calibration.qconfig import QuantConfig
from calibration.quant_unet import quantize_model
from calibration.trajectories import generate_trajectories, heldout_seed
from engines.errors import AdpdmError
from tiny_models import tiny_unet2d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import DDPM_CONFIG

    unet = tiny_unet2d()
    cache = tmp_path_factory.mktemp("cache")
    traj = generate_trajectories(unet, DDPM_CONFIG, num_samples=4, num_steps=8, seed=0, cache_dir=cache)
    held = generate_trajectories(unet, DDPM_CONFIG, num_samples=4, num_steps=8, seed=heldout_seed(0), cache_dir=cache)
    return unet, DDPM_CONFIG, traj, held


def test_minmax_scale_is_observed_max_over_all_steps(setup):
    unet, cfg, traj, _ = setup
    res = calibrate(unet, cfg, MinMaxConfig(), data=traj)
    name = "down_blocks.1.resnets.0.conv1"
    seen = []
    layer = dict(unet.named_modules())[name]
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(float(a[0].abs().max())))
    with torch.no_grad():
        for i, t in enumerate(traj.timesteps.tolist()):
            unet(traj.x_t[i], torch.full((4,), t))
    h.remove()
    assert res.num_groups == 1 and res.timestep_to_group.eq(0).all()
    assert res.activation_scales[f"{name}.input_quantizer"].item() == pytest.approx(max(seen) / 127, rel=1e-6)
    assert res.calib_timestep is None and res.method == "minmax"


def test_percentile_below_minmax(setup):
    unet, cfg, traj, _ = setup
    mm = calibrate(unet, cfg, MinMaxConfig(), data=traj)
    pc = calibrate(unet, cfg, PercentileConfig(percentile=99.0), data=traj)
    ratios = [float(pc.activation_scales[n] / mm.activation_scales[n]) for n in mm.activation_scales]
    assert all(r <= 1.0 + 1e-6 for r in ratios) and min(ratios) < 0.9


def test_uniform_groups_and_per_step(setup):
    unet, cfg, traj, _ = setup
    ug = calibrate(unet, cfg, UniformGroupsConfig(groups=2), data=traj)
    assert ug.num_groups == 2 and [g["timestep_ranges"] for g in ug.groups] == [[[0, 499]], [[500, 999]]]
    assert all(s.shape == (2,) for s in ug.activation_scales.values())
    assert sorted(t for g in ug.groups for t in g["calib_timesteps"]) == sorted(traj.timesteps.tolist())
    ps = calibrate(unet, cfg, PerStepConfig(), data=traj)
    assert ps.num_groups == 8
    for g in ps.groups:
        (t,) = g["calib_timesteps"]
        assert ps.group_of(t) == g["id"]
    # each group's scale is the max over its own steps: the max over groups is the one-group scale
    mm = calibrate(unet, cfg, MinMaxConfig(), data=traj)
    for n, s in mm.activation_scales.items():
        assert ps.activation_scales[n].max().item() == pytest.approx(s.item(), rel=1e-6)
    with pytest.raises(AdpdmError, match="no calibration step"):
        calibrate(unet, cfg, UniformGroupsConfig(groups=20), data=traj)


def test_bad_arguments(setup):
    unet, cfg, traj, _ = setup
    with pytest.raises(AdpdmError, match="unknown method"):
        method_config("kmeans")
    for bits in (1, 9, 0, "x"):
        with pytest.raises(AdpdmError, match="bits"):
            QuantConfig(w_bits=bits)
        with pytest.raises(AdpdmError, match="bits"):
            QuantConfig(a_bits=bits)
    with pytest.raises(AdpdmError, match="groups must be >= 1"):
        UniformGroupsConfig(groups=0)
    with pytest.raises(AdpdmError, match="one scale set"):
        method_config("minmax", {"groups": 4})
    assert method_config("minmax", {"groups": 1}) == MinMaxConfig()  # --groups 1 says what minmax does
    with pytest.raises(AdpdmError, match="per-step has no setting groups"):
        method_config("per-step", {"groups": 3})
    with pytest.raises(AdpdmError, match="calibration steps"):
        calibrate(unet, cfg, MinMaxConfig(), data=DataFreeConfig(steps=1001))
    with pytest.raises(AdpdmError, match="samples must be >= 1"):
        DataFreeConfig(samples=0)
    with pytest.raises(AdpdmError, match="percentile"):
        PercentileConfig(percentile=0)
    with pytest.raises(AdpdmError, match="method must be one of the method configs"):
        calibrate(unet, cfg, "minmax", data=traj)  # type: ignore[arg-type]
    with pytest.raises(AdpdmError, match="quant must be a QuantConfig"):
        calibrate(unet, cfg, MinMaxConfig(), {"w_bits": 8}, data=traj)  # type: ignore[arg-type]
    with pytest.raises(AdpdmError, match="batch_size"):
        calibrate(unet, cfg, MinMaxConfig(), data=traj, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(AdpdmError, match="cuda"):
            resolve_device("cuda")


def test_configs_are_frozen_and_cast_from_text():
    import dataclasses

    c = method_config("adpdm", {"groups": "2", "search_iters": "5", "calib_step": "last", "search_items": "none",
                                "lambda_mmd": "3.5"})
    assert c == ADPDMConfig(groups=2, search_iters=5, calib_step="last", search_items=None, lambda_mmd=3.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.groups = 3  # type: ignore[misc]
    with pytest.raises(AdpdmError, match="search_iters must be >= 0"):
        dataclasses.replace(c, search_iters=-5)  # checked again on every change
    with pytest.raises(AdpdmError, match="must be int"):
        method_config("adpdm", {"search_iters": "many"})
    with pytest.raises(AdpdmError, match="adpdm has no setting serch_iters"):
        method_config("adpdm", {"serch_iters": 3})
    assert ADPDMConfig(calib_step="3").calib_step == 3
    assert method_config(c.method, {k: v for k, v in c.to_dict().items() if k != "method"}) == c


def test_register_method(setup):
    unet, cfg, traj, _ = setup
    from calibration.method_api import MethodOutput
    from calibration.pipeline import _minmax

    old = METHODS[ADPDMConfig]
    register_method(ADPDMConfig, lambda ctx: MethodOutput(**{**_minmax(ctx).__dict__, "calib_timestep": 123}))
    try:
        res = calibrate(unet, cfg, ADPDMConfig(), data=traj)
        assert res.method == "adpdm" and res.calib_timestep == 123
    finally:
        METHODS[ADPDMConfig] = old


def _rel_l2(unet, cfg, traj, held, w_bits, a_bits, method="minmax"):
    res = calibrate(unet, cfg, method_config(method), QuantConfig(w_bits=w_bits, a_bits=a_bits), data=traj)
    return noise_rel_l2(quantize_model(unet, result=res), held)["mean"]


def test_error_falls_as_bits_rise_tiny(setup):
    unet, cfg, traj, held = setup
    e8, e6, e4 = (_rel_l2(unet, cfg, traj, held, 8, a) for a in (8, 6, 4))
    assert e8 < e6 < e4
    assert _rel_l2(unet, cfg, traj, held, 4, 8) > e8


REFERENCE = pytest.mark.skipif(
    not __import__("adpdm_export.model_loading", fromlist=["REFERENCE_DIR"]).REFERENCE_DIR.joinpath(
        "model_index.json").is_file(),
    reason="bundled reference model not trained yet",
)


@pytest.mark.slow
@REFERENCE
def test_error_falls_as_bits_rise_reference(tmp_path):
    from adpdm_export.model_loading import load_model

    m = load_model("reference")
    traj = generate_trajectories(m.unet, m.scheduler_config, num_samples=16, num_steps=20, seed=0,
                                 cond=m.default_condition(16), cache_dir=tmp_path)
    held = generate_trajectories(m.unet, m.scheduler_config, num_samples=8, num_steps=20, seed=heldout_seed(0),
                                 cond=m.default_condition(8), cache_dir=tmp_path)
    e = {a: _rel_l2(m.unet, m.scheduler_config, traj, held, 8, a) for a in (8, 6, 4)}
    assert e[8] < e[6] < e[4]
    # per-step groups are the ceiling: no worse than one scale set at 6 bits
    assert _rel_l2(m.unet, m.scheduler_config, traj, held, 8, 6, "per-step") <= e[6] * 1.05


@pytest.mark.parametrize("method, kw", [("percentile", {}), ("uniform-groups", {"groups": 2, "stat": "percentile"}),
                                        ("per-step", {})])
def test_observing_while_sampling_equals_a_separate_pass(tmp_path, method, kw):
    from conftest import DDPM_CONFIG

    unet = tiny_unet2d(seed=3)
    args = dict(method=method_config(method, kw), data=DataFreeConfig(samples=3, steps=4), cache_dir=str(tmp_path),
                batch_size=2)
    first = calibrate(unet, DDPM_CONFIG, **args)  # samples (and observes while sampling)
    assert len(list(tmp_path.glob("stepstats-*.safetensors"))) == 1
    second = calibrate(unet, DDPM_CONFIG, **args)  # trajectories and statistics from the cache
    other = tmp_path / "only-trajectories"
    other.mkdir()
    for f in tmp_path.glob("trajectories-*.safetensors"):
        (other / f.name).write_bytes(f.read_bytes())
    third = calibrate(unet, DDPM_CONFIG, **{**args, "cache_dir": str(other)})  # a separate observation pass
    assert first.config["calibration"]["observed_while_sampling"]
    assert not second.config["calibration"]["observed_while_sampling"]
    assert second.config["calibration"]["trajectories_cached"] and third.config["calibration"]["trajectories_cached"]
    for n, s in first.activation_scales.items():
        assert torch.equal(s, second.activation_scales[n]), n
        assert torch.equal(s, third.activation_scales[n]), n
    # other quantizers (config) are another statistics key
    calibrate(unet, DDPM_CONFIG, **{**args, "quant": QuantConfig(quantize_attention_bmm=True)})
    assert len(list(tmp_path.glob("stepstats-*.safetensors"))) == 2
