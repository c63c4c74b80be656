"""TimestepDispatchRunner on tiny onnxruntime builds: dispatch by timestep value, input checks, diffusers drop-in.

The fixture builds (tests/engines_fixtures.py) have G group graphs that are one tiny
random UNet plus `out += 10 * k` for group k, with a table whose group ids are in neither
timestep order nor batch order: [0, 250) -> 1, [250, 600) -> 2, [600, 1000) -> 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

from engines.errors import AdpdmError
from engines.manifest import load_manifest, write_manifest
from engines.runner import TimestepDispatchRunner
from engines.sampler import sample as run_sampler
from engines_fixtures import copy_build, make_build

OFFSET = 10.0  # group k adds OFFSET * k


@pytest.fixture(scope="session")
def build3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build3")
    make_build(folder, num_groups=3)
    return folder


@pytest.fixture(scope="session")
def build_cls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build_cls")
    make_build(folder, num_groups=2, conditioning={"class_labels": {"num_classes": 10}})
    return folder


@pytest.fixture(scope="session")
def build_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build_text")
    make_build(folder, num_groups=2, conditioning={"encoder_hidden_states": {"dim": 24}})
    return folder


@pytest.fixture(scope="module")
def runner(build3):
    r = TimestepDispatchRunner(build3, threads=1)
    yield r
    r.close()


def x_of(batch, seed=0, shape=(1, 16, 16)):
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def direct(runner, k, x, t, **cond):
    """Group k run by its backend on the whole batch (no dispatch)."""
    return runner.group_backend.run(k, {"sample": x, "timestep": t, **cond})


def test_loads_and_describes(runner, build3):
    assert runner.backend == "ort" and runner.target == "ort" and runner.num_groups == 3
    assert runner.sample_shape == (1, 16, 16) and runner.num_train_timesteps == 1000
    assert runner.group_of(torch.tensor([0, 249, 250, 599, 600, 999])).tolist() == [1, 1, 2, 2, 0, 0]
    assert "backend='ort'" in repr(runner)
    # from the manifest file or a loaded Manifest too
    r2 = TimestepDispatchRunner(build3 / "manifest.json", backend="ort", verify="size")
    r3 = TimestepDispatchRunner(load_manifest(build3), backend="auto")
    assert r2.backend == r3.backend == "ort"


def test_mixed_batch_equals_per_group_runs(runner):
    x = x_of(6)
    t = torch.tensor([900, 10, 500, 10, 300, 999])  # groups 0, 1, 2, 1, 2, 0
    y = runner(x, t)
    assert y.shape == x.shape and y.dtype == torch.float32
    groups = runner.group_of(t)
    for k in range(3):
        idx = torch.nonzero(groups == k).flatten()
        ref = direct(runner, k, x[idx], t[idx])
        torch.testing.assert_close(y[idx], ref, atol=1e-5, rtol=1e-5)
    # and item by item
    for i in range(6):
        torch.testing.assert_close(y[i : i + 1], runner(x[i : i + 1], t[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_group_follows_the_timestep_value_not_position_or_call_order(runner):
    """Were the group chosen by batch position or by call count, the offsets would not follow t."""
    x = x_of(4, seed=1)
    base = lambda xx, tt: direct(runner, 0, xx, tt)  # group 0 adds 0  # noqa: E731
    t = torch.tensor([10, 999, 300, 610])  # groups 1, 0, 2, 0
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        o = torch.tensor(order)
        y = runner(x[o], t[o])
        offsets = (y - base(x[o], t[o])).mean(dim=(1, 2, 3))
        expected = OFFSET * runner.group_of(t[o]).float()
        torch.testing.assert_close(offsets, expected, atol=1e-3, rtol=0)
    # calls in a different order of groups: still keyed on the timestep value
    for tt in (999, 300, 10, 300, 999):
        y = runner(x, tt)
        k = runner.group_of(tt).item()
        torch.testing.assert_close((y - base(x, torch.full((4,), tt))).mean(), torch.tensor(OFFSET * k), atol=1e-3, rtol=0)


@pytest.mark.parametrize("t", [500, np.int64(500), torch.tensor(500), torch.tensor([500]), 500.0, torch.tensor(500.0)])
def test_scalar_timestep_broadcasts(runner, t):
    x = x_of(3)
    torch.testing.assert_close(runner(x, t), runner(x, torch.full((3,), 500)), atol=0, rtol=0)


def test_numpy_sample_and_predict_alias(runner):
    x = x_of(2)
    torch.testing.assert_close(runner.predict(x.numpy(), torch.tensor([1, 2])), runner(x, torch.tensor([1, 2])))


BAD_INPUTS = {
    "channels": (lambda: x_of(2, shape=(3, 16, 16)), [1, 2], {}, "3 channels, the model takes 1"),
    "resolution": (lambda: x_of(2, shape=(1, 32, 32)), [1, 2], {}, "32x32, the build is calibrated for 16x16"),
    "rank": (lambda: torch.zeros(1, 16, 16), [1], {}, "must be \\(batch, 1, H, W\\)"),
    "float64": (lambda: x_of(2).double(), [1, 2], {}, "must be float32, got torch.float64"),
    "float16": (lambda: x_of(2).half(), [1, 2], {}, "must be float32, got torch.float16"),
    "int": (lambda: torch.zeros(2, 1, 16, 16, dtype=torch.int64), [1, 2], {}, "must be float32"),
    "list": (lambda: [[0.0]], [1], {}, "must be a torch tensor"),
    "t<0": (lambda: x_of(2), [-1, 2], {}, "timestep -1 is outside \\[0, 1000\\)"),
    "t>=T": (lambda: x_of(2), [5, 1000], {}, "timestep 1000 is outside \\[0, 1000\\)"),
    "t count": (lambda: x_of(3), [1, 2], {}, "timestep has 2 values for a batch of 3"),
    "t fractional": (lambda: x_of(2), torch.tensor([1.5, 2.0]), {}, "integer training timesteps"),
    "t bool": (lambda: x_of(2), torch.tensor([True, False]), {}, "integer timestep values"),
    "t 2d": (lambda: x_of(2), torch.zeros(2, 1, dtype=torch.int64), {}, "scalar or a \\(batch,\\) tensor"),
    "t string": (lambda: x_of(2), "500", {}, "must be an int or a tensor"),
    "nan": (lambda: x_of(3).index_fill_(0, torch.tensor([1]), float("nan")), [1, 2, 3], {}, "NaN or inf \\(batch item\\(s\\) \\[1\\]\\)"),
    "inf": (lambda: x_of(2).index_fill_(0, torch.tensor([0]), float("inf")), [1, 2], {}, "NaN or inf"),
    "extra cond": (lambda: x_of(2), [1, 2], {"class_labels": torch.tensor([1, 2])}, "unexpected conditioning input\\(s\\) \\['class_labels'\\]"),
    "unknown cond": (lambda: x_of(2), [1, 2], {"mask": torch.ones(2)}, "unexpected conditioning"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_before_anything_runs(runner, monkeypatch, case):
    make_x, t, cond, msg = BAD_INPUTS[case]
    calls = []
    monkeypatch.setattr(runner, "_run_group", lambda *a, **k: calls.append(a))
    if isinstance(t, list):
        t = torch.tensor(t)
    with pytest.raises(AdpdmError, match=msg):
        runner(make_x(), t, **cond)
    assert calls == []


def test_none_conditioning_is_ignored(runner):
    x = x_of(2)
    torch.testing.assert_close(runner(x, 5, encoder_hidden_states=None), runner(x, 5))


def test_class_conditioning(build_cls):
    r = TimestepDispatchRunner(build_cls, threads=1)
    x, t = x_of(4), torch.tensor([10, 700, 20, 900])  # groups 1, 0, 1, 0
    labels = torch.tensor([3, 1, 4, 1])
    y = r(x, t, class_labels=labels)
    for k in range(2):
        idx = torch.nonzero(r.group_of(t) == k).flatten()
        torch.testing.assert_close(y[idx], direct(r, k, x[idx], t[idx], class_labels=labels[idx]), atol=1e-5, rtol=1e-5)
    # labels matter, and one label broadcasts
    assert not torch.allclose(y, r(x, t, class_labels=torch.tensor([0, 0, 0, 0])))
    torch.testing.assert_close(r(x, t, class_labels=7), r(x, t, class_labels=torch.full((4,), 7)))
    for cond, msg in [
        ({}, "missing conditioning input\\(s\\) \\['class_labels'\\]"),
        ({"class_labels": torch.tensor([1, 2, 3, 10])}, "class_labels must be in \\[0, 10\\)"),
        ({"class_labels": torch.tensor([1.0, 2, 3, 4])}, "class_labels must be an integer tensor"),
        ({"class_labels": torch.tensor([1, 2])}, "class_labels has 2 values for a batch of 4"),
        ({"class_labels": labels, "encoder_hidden_states": torch.zeros(4, 4, 24)}, "unexpected conditioning"),
    ]:
        with pytest.raises(AdpdmError, match=msg):
            r(x, t, **cond)


def test_backend_choice(build3):
    with pytest.raises(AdpdmError, match="no TensorRT engines"):
        TimestepDispatchRunner(build3, backend="trt")
    with pytest.raises(AdpdmError, match="unknown backend 'cuda'"):
        TimestepDispatchRunner(build3, backend="cuda")
    with pytest.raises(AdpdmError, match="no 'fp' graph"):
        TimestepDispatchRunner(build3, target="fp")


def test_tampered_build_is_refused(build3, tmp_path):
    b = copy_build(build3, tmp_path / "b")
    with open(b / "unet.g2.ort.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(AdpdmError, match="unet.g2.ort.onnx does not match its sha256"):
        TimestepDispatchRunner(b)


def test_graphs_disagreeing_with_the_manifest(build3, tmp_path):
    b = copy_build(build3, tmp_path / "b")
    m = load_manifest(b)
    m.model.conditioning = {"class_labels": {"num_classes": 10}}
    write_manifest(b, m)
    with pytest.raises(AdpdmError, match="the build is inconsistent"):
        TimestepDispatchRunner(b)


# ---------------------------------------------------------------------------- diffusers drop-in


def test_as_unet_exposes_what_pipelines_read(runner):
    unet = runner.as_unet()
    assert isinstance(unet, torch.nn.Module) and list(unet.parameters()) == []
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 and unet.config["out_channels"] == 1
    assert unet.config.time_cond_proj_dim is None
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    x = x_of(2)
    out = unet(x, torch.tensor(300))
    torch.testing.assert_close(out.sample, runner(x, 300))
    (tup,) = unet(x, 300, return_dict=False)
    torch.testing.assert_close(tup, out.sample)
    assert unet.to("cpu") is unet and unet.eval() is unet
    half = unet(x.half(), 300).sample
    assert half.dtype == torch.float16
    with pytest.raises(AdpdmError, match="timestep_cond is not supported"):
        unet(x, 300, timestep_cond=torch.zeros(2, 4))
    with pytest.raises(AdpdmError, match="unknown argument 'foo'"):
        unet(x, 300, foo=1)


def test_ddim_pipeline_matches_the_sampler(runner, monkeypatch):
    """The same noise through DDIMPipeline(unet=runner.as_unet()) and engines.sampler.sample gives the same images."""
    steps, batch, seed = 8, 3, 11
    scheduler_config = runner.manifest.scheduler
    pipe = DDIMPipeline(unet=runner.as_unet(), scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    seen = []
    real = runner._run_group
    monkeypatch.setattr(runner, "_run_group", lambda k, *a: seen.append(k) or real(k, *a))
    # our loop re-derives eps from a clipped x0 (engines.sampler.scheduler_step_kwargs): ask the pipeline to
    images = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="np", use_clipped_model_output=True).images
    assert set(seen) == {0, 1, 2}  # the run crossed every group
    # DDIMPipeline draws its latents with randn_tensor(shape, generator) on the CPU
    noise = torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    ours = run_sampler(runner, DDIMScheduler.from_config(scheduler_config), noise, steps).images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == ours.shape == (batch, 16, 16, 1)
    np.testing.assert_allclose(images, ours, atol=1e-5, rtol=0)


def test_ddpm_pipeline_runs(runner):
    from diffusers import DDPMScheduler

    pipe = DDPMPipeline(unet=runner.as_unet(), scheduler=DDPMScheduler.from_config(runner.manifest.scheduler))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np").images
    assert out.shape == (2, 16, 16, 1) and np.isfinite(out).all()


def test_text_conditioned_call_like_stable_diffusion(build_text):
    r = TimestepDispatchRunner(build_text, threads=1)
    unet = r.as_unet()
    assert unet.config.cross_attention_dim == 24 and unet.config.in_channels == 4
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 7, 24, generator=g)
    t = torch.tensor(700)  # scalar, as the pipelines pass it; batch doubled by classifier-free guidance
    (eps,) = unet(
        torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([ehs, ehs]), timestep_cond=None,
        cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False,
    )
    ref = r(torch.cat([latents] * 2), 700, encoder_hidden_states=torch.cat([ehs, ehs]))
    torch.testing.assert_close(eps, ref)
    torch.testing.assert_close(eps[:2], eps[2:])
    with pytest.raises(AdpdmError, match="missing conditioning input"):
        unet(latents, t)
    with pytest.raises(AdpdmError, match="encoder_hidden_states must be \\(batch=2, sequence, 24\\)"):
        unet(latents, t, encoder_hidden_states=torch.zeros(2, 7, 32))
    with pytest.raises(AdpdmError, match="added_cond_kwargs is not supported"):
        unet(latents, t, encoder_hidden_states=ehs, added_cond_kwargs={"text_embeds": torch.zeros(2, 4)})


def test_manifest_of_fixture_is_valid_json(build3):
    d = json.loads((build3 / "manifest.json").read_text())
    assert d["backend"] == "ort" and len(d["timestep_to_group"]) == 1000


def test_backend_input_spec_limits_are_checked_before_running(build3, monkeypatch):
    """The limits a backend declares (here a TensorRT-like optimization profile on the onnxruntime backend) are the
    runner's checks: the TensorRT path's messages, without TensorRT."""
    import engines.runner as runner_module
    from engines.group_backend import InputSpec, open_group_backend

    def limited(manifest, backend, **kw):
        b = open_group_backend(manifest, "ort", **kw)
        b.input_spec = InputSpec(names=b.input_spec.names, batch=(2, 3), height=(16, 32), width=(16, 16))
        return b

    monkeypatch.setattr(runner_module, "open_group_backend", limited)
    r = TimestepDispatchRunner(build3, backend="ort", threads=1)
    assert (r.min_batch, r.max_batch, r.chunk) == (2, 3, 3)
    calls = []
    run = r.group_backend.run
    r.group_backend.run = lambda k, feeds: calls.append(feeds["sample"].shape[0]) or run(k, feeds)
    y = r(x_of(4), 10)  # above the largest batch: two chunks of 2 (near-equal, none below the smallest)
    assert calls == [2, 2] and torch.equal(y, torch.cat([r(x_of(4)[:2], 10), r(x_of(4)[2:], 10)]))
    with pytest.raises(AdpdmError, match=r"below the smallest batch the TensorRT engines were built for \(2\)"):
        r(x_of(1), 10)
    with pytest.raises(AdpdmError, match=r"outside the TensorRT optimization profile \(16..32 x 16..16\)"):
        r(x_of(2, shape=(1, 16, 24)), 10)
    assert r(x_of(2, shape=(1, 32, 16)), 10).shape == (2, 1, 32, 16)  # inside the optimization profile: it runs
    r.close()


def test_large_batches_run_in_chunks_and_a_closed_runner_says_so(build3):
    r = TimestepDispatchRunner(build3, backend="ort", threads=1, chunk=4)
    calls = []
    run = r.group_backend.run
    r.group_backend.run = lambda k, feeds: calls.append(feeds["sample"].shape[0]) or run(k, feeds)
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900, 400] * 3 + [10])
    y = r(x, t)
    assert max(calls) <= 4 and sum(calls) == 10  # chunks 4, 3, 3, each split by group
    parts = [r(x[a:b], t[a:b]) for a, b in ((0, 4), (4, 7), (7, 10))]
    assert torch.equal(y, torch.cat(parts))
    assert TimestepDispatchRunner(build3, backend="ort", threads=1).chunk == 16  # onnxruntime's default
    with pytest.raises(AdpdmError, match="chunk must be an integer >= 1"):
        TimestepDispatchRunner(build3, backend="ort", chunk=0)
    r.close()
    r.close()  # idempotent
    with pytest.raises(AdpdmError, match="this runner is closed"):
        r(x[:1], 10)

