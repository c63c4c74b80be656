"""The Python facade (`import adpdm_export as adpdm`) and calibration from the user's own data."""

from __future__ import annotations

import pytest
import torch

import adpdm_export as adpdm
from calibration.trajectories import generate_trajectories
from tiny_models import save_unet_folder, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_facade_name_resolves():
    for name in adpdm.__all__:
        assert getattr(adpdm, name) is not None, name
    assert callable(adpdm.build_engine) and not isinstance(adpdm.build_engine, type(adpdm))  # not a module
    with pytest.raises(AttributeError):
        adpdm.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return adpdm.load_model(str(save_unet_folder(tiny_unet2d(), tmp_path_factory.mktemp("api") / "unet")))


def test_calibrate_save_load_export_run_sample(model, tmp_path):
    result = adpdm.calibrate(model, adpdm.UniformGroupsConfig(groups=2), data=adpdm.DataFreeConfig(samples=2, steps=4))
    assert result.num_groups == 2 and result.method == "uniform-groups"
    assert result.config["calibration"]["method_config"] == adpdm.UniformGroupsConfig(groups=2).to_dict()
    result.save(tmp_path / "calib")
    back = adpdm.CalibrationResult.load(tmp_path / "calib", expected_model_sha256=model.sha256)
    manifest = adpdm.export(model, back, tmp_path / "build", targets=("ort",))
    assert manifest.num_groups == 2 and list(manifest.targets()) == ["ort"]
    runner = adpdm.Runner(tmp_path / "build")
    q = adpdm.sample(runner, n=3, steps=4, seed=5)
    fp = adpdm.sample(model, n=3, steps=4, seed=5)
    assert q.shape == fp.shape == (3, *model.sample_shape)
    # same seeds, same noise: the INT8 build follows the FP model closely, a different seed does not
    other = adpdm.sample(model, n=3, steps=4, seed=6)
    assert (q - fp).pow(2).mean() < 0.1 * (other - fp).pow(2).mean()
    with pytest.raises(adpdm.AdpdmError, match="Runner or a LoadedModel"):
        adpdm.sample("build", n=1)  # type: ignore[arg-type]


def test_export_refuses_a_result_of_another_model(model, tmp_path):
    other = adpdm.load_model(str(save_unet_folder(tiny_unet2d(seed=1), tmp_path / "other")))
    result = adpdm.calibrate(other, adpdm.MinMaxConfig(), data=adpdm.DataFreeConfig(samples=2, steps=2))
    with pytest.raises(adpdm.AdpdmError, match="recalibrate"):
        adpdm.export(model, result, tmp_path / "build")


def _batches_of(traj):
    """A TrajectorySet as the user's (x_t, t, cond) batches: per timestep, items in two batches."""
    for i, t in enumerate(traj.timesteps.tolist()):
        for sl in (slice(0, 2), slice(2, None)):
            yield traj.x_t[i, sl], t, traj.cond_for(sl)


def test_user_batches_calibrate_like_the_same_trajectories(model):
    traj = generate_trajectories(model.unet, model.scheduler_config, num_samples=3, num_steps=4, seed=0)
    from_traj = adpdm.calibrate(model, adpdm.UniformGroupsConfig(groups=2), data=traj)
    from_batches = adpdm.calibrate(model, adpdm.UniformGroupsConfig(groups=2), data=lambda: _batches_of(traj))
    assert from_batches.config["calibration"]["data"] == "user"
    assert torch.equal(from_traj.timestep_to_group, from_batches.timestep_to_group)
    for name, scale in from_traj.activation_scales.items():
        assert torch.equal(scale, from_batches.activation_scales[name]), name


def test_user_batches_give_fp_predictions(model):
    from calibration.user_data import trajectories_from_batches

    traj = generate_trajectories(model.unet, model.scheduler_config, num_samples=3, num_steps=4, seed=0)
    got = trajectories_from_batches(model.unet, model.scheduler_config, list(_batches_of(traj)), model_sha=model.sha256)
    assert torch.equal(got.timesteps, traj.timesteps)
    assert torch.allclose(got.eps, traj.eps, atol=1e-5) and torch.allclose(got.x0_hat, traj.x0_hat, atol=1e-4)


@pytest.mark.parametrize("data, message", [
    ([], "yielded no batches"),
    (42, "iterable of (x_t, t[, cond]) batches"),
    ([(torch.randn(2, 1, 16, 16),)], "expected (x_t, t) or (x_t, t, cond)"),
    ([(torch.randn(2, 16, 16), 5)], "float (B, C, H, W)"),
    ([(torch.randn(2, 1, 8, 8), 5)], "the model takes (1, 16, 16)"),
    ([(torch.randn(2, 1, 16, 16), 1000)], "outside 0..999"),
    ([(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]))], "3 timesteps for 2 items"),
    ([(torch.full((2, 1, 16, 16), float("nan")), 5)], "NaN"),
    ([(torch.randn(2, 1, 16, 16), 5), (torch.randn(1, 1, 16, 16), 9)], "same number of items"),
])
def test_bad_user_data_is_one_line(model, data, message):
    with pytest.raises(adpdm.AdpdmError, match=__import__("re").escape(message)):
        adpdm.calibrate(model, adpdm.MinMaxConfig(), data=data)


def test_user_conditions_must_follow_the_items(tmp_path):
    m = adpdm.load_model(str(save_unet_folder(tiny_unet2d(num_class_embeds=10), tmp_path / "unet")))
    x = torch.randn(2, *m.sample_shape)
    same = [(x, 900, {"class_labels": torch.tensor([1, 2])}), (x, 100, {"class_labels": torch.tensor([1, 2])})]
    result = adpdm.calibrate(m, adpdm.MinMaxConfig(), data=same)
    assert result.config["calibration"]["cond_keys"] == ["class_labels"]
    swapped = [same[0], (x, 100, {"class_labels": torch.tensor([2, 1])})]
    with pytest.raises(adpdm.AdpdmError, match="must be the same at every timestep"):
        adpdm.calibrate(m, adpdm.MinMaxConfig(), data=swapped)


def test_adpdm_on_few_samples_scales_srm_down_or_says_why(model):
    config = adpdm.ADPDMConfig(groups=2, search_iters=2, refine_iters=1, srm_candidates=2, srm_eval_steps=2,
                               search_items=2)
    with pytest.raises(adpdm.AdpdmError, match="at least 3 calibration samples"):
        adpdm.calibrate(model, config, data=adpdm.DataFreeConfig(samples=2, steps=4))
    result = adpdm.calibrate(model, config, data=adpdm.DataFreeConfig(samples=4, steps=4))
    assert result.extra["adpdm"]["config"]["srm"]["heldout_items"] == 1  # a quarter of 4, not the default 16
    fixed = adpdm.calibrate(model, adpdm.ADPDMConfig(groups=1, calib_step="last", search_iters=1, refine_iters=1),
                            data=adpdm.DataFreeConfig(samples=1, steps=2))  # no SRM: one sample is enough
    assert fixed.extra["adpdm"]["srm"] is None
