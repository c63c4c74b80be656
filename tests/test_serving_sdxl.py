"""Serving an SDXL-layout build (issue 15): the `unet` model takes `text_embeds` (P) and `time_ids` (6)
per item, `generate` takes them as (1 or n, P) / (1 or n, 6) (time_ids default: the build's) or a
prompt, which the server encodes with both encoders; the export-triton repository carries both
encoders and its models take the added inputs.

The build is the tiny SDXL pipeline's UNet (tests/tiny_models.save_sdxl_pipeline), calibrated by
`adpdm.build_engine` on the onnxruntime target (a few seconds). The request checks run without
Triton; the network tests need the serve environment (PyTriton, tritonclient).
"""

from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import pytest
import torch

import adpdm_export as adpdm
from engines.errors import AdpdmError
from engines.serving import AdpdmServer, GenerateModel, ServeLimits, UnetModel, generate_images
from tiny_models import save_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = ServeLimits(max_batch=8, max_queue_delay_us=20000, max_n=4, max_steps=20, exit_timeout_s=2)
PROMPT = "a handwritten seven"
TIME_IDS = [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]  # the tiny pipeline's default size (16 x a 2x VAE), no crop


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-serve") / "pipe")


@pytest.fixture(scope="module")
def build(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-serve-build") / "build"
    adpdm.build_engine(str(pipe), out, adpdm.UniformGroupsConfig(groups=2), data=adpdm.DataFreeConfig(samples=2, steps=4),
                       backend="ort", targets=("ort",), prompts=[PROMPT], guidance_scale=3.0)
    return out


@pytest.fixture(scope="module")
def runner(build):
    from engines.runner import TimestepDispatchRunner

    with TimestepDispatchRunner(build, backend="ort", threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def text(runner):
    from engines.text_pipeline import load_build_pipeline

    return load_build_pipeline(runner.manifest)


@pytest.fixture(scope="module")
def model(runner, text):
    return GenerateModel(runner, LIMITS, text)


def _req(n=2, steps=3, seed=1, prompt=None, guidance=None, **extra):
    r = {"seed": np.array([seed], np.int64), "n": np.array([n], np.int64), "steps": np.array([steps], np.int64)}
    if prompt is not None:
        r["prompt"] = np.array([prompt.encode()], np.object_)
    if guidance is not None:
        r["guidance_scale"] = np.array([guidance], np.float64)
    return {**r, **extra}


def _embeds(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(n, 8, 24, generator=g).numpy(),
            "text_embeds": torch.randn(n, 16, generator=g).numpy()}


def _reference(runner, text, prompt, guidance, n, steps, seed, negative=None):
    """What `adpdm sample BUILD --prompt` computes (the same library calls, in process)."""
    from engines.conditioning import default_condition
    from engines.text_pipeline import PromptRequest, guided_conditions

    g = guided_conditions(text.text_encoder, PromptRequest(prompt, negative, guidance), n,
                          default_condition(runner.manifest.model.conditioning, n))
    return generate_images(runner, seed, n, steps, "ddim", g.cond, g.guidance_scale, g.uncond, text.decode)


# --------------------------------------------------------------------------- without Triton


def test_the_build_is_sdxl_and_its_text_pipeline_has_both_encoders(runner, text):
    assert runner.manifest.model.conditioning["text_embeds"] == {"dim": 16}
    assert runner.manifest.model.conditioning["time_ids"]["default"] == TIME_IDS
    assert type(text.text_encoder).__name__ == "SdxlTextEncoders"


def test_generate_takes_the_added_conditions_and_defaults_the_time_ids(model, runner):
    e = _embeds(1)
    parsed = model.parse(_req(n=3, **e))
    assert parsed.cond["text_embeds"].shape == (3, 16) and torch.equal(parsed.cond["text_embeds"][2],
                                                                       torch.from_numpy(e["text_embeds"][0]))
    assert parsed.cond["time_ids"].tolist() == [TIME_IDS] * 3  # missing: the build's default
    ids = np.array([[64, 48, 4, 2, 32, 32], [32, 32, 0, 0, 32, 32]], np.float32)
    parsed = model.parse(_req(n=2, time_ids=ids, **_embeds(2)))
    assert parsed.cond["time_ids"].numpy().tolist() == ids.tolist()
    # with a prompt, time_ids given by the request win over the encoder's default ones
    prompted = model.parse(_req(n=2, prompt=PROMPT, guidance=1.0, time_ids=ids[:1]))
    images, _ = model.run(prompted)
    plain, _ = model.run(model.parse(_req(n=2, prompt=PROMPT, guidance=1.0)))
    assert images.shape == plain.shape == (2, 1, 32, 32) and (images - plain).abs().max() > 1e-4


BAD_GENERATE = [
    ("text_embeds too wide", dict(text_embeds=np.zeros((1, 17), np.float32)), r"text_embeds must be \(1 or n=2, 16\)"),
    ("text_embeds n mismatch", dict(text_embeds=np.zeros((3, 16), np.float32)), r"text_embeds must be \(1 or n=2, 16\)"),
    ("text_embeds NaN", dict(text_embeds=np.full((1, 16), np.nan, np.float32)), r"text_embeds contains NaN or inf"),
    ("time_ids 5 values", dict(time_ids=np.zeros((1, 5), np.float32)), r"time_ids must be \(1 or n=2, 6\)"),
    ("time_ids negative", dict(time_ids=np.array([[32, 32, -1, 0, 32, 32]], np.float32)), r"each must be in \[0, 65536\]"),
    ("time_ids inf", dict(time_ids=np.array([[np.inf, 32, 0, 0, 32, 32]], np.float32)), r"time_ids contains NaN or inf"),
    ("time_ids integers", dict(time_ids=np.zeros((1, 6), np.int64)), r"time_ids must be floating point"),
    ("text_embeds missing", dict(text_embeds=None), r"missing input 'text_embeds'"),
    ("prompt and text_embeds", dict(prompt=PROMPT), r"give prompt or text_embeds, not both"),
]


@pytest.mark.parametrize("case", BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
def test_bad_added_conditions_of_generate_are_one_line(model, case):
    _, kw, pattern = case
    kw = dict(kw)
    prompt = kw.pop("prompt", None)
    e = {"text_embeds": _embeds(1)["text_embeds"]} if prompt else _embeds(1)
    e.update(kw)
    if prompt:
        e.pop("encoder_hidden_states", None)
    req = _req(prompt=prompt, **{k: v for k, v in e.items() if v is not None})
    with pytest.raises(AdpdmError, match=pattern) as err:
        model.parse(req)
    assert "\n" not in str(err.value)


def test_bad_added_conditions_of_unet_are_one_line(runner):
    unet = UnetModel(runner, LIMITS)
    good = {"sample": np.zeros((1, 4, 16, 16), np.float32), "timestep": np.array([[10]], np.int64),
            **_embeds(1), "time_ids": np.array([TIME_IDS], np.float32)}
    unet.check(good)
    for change, pattern in [({"time_ids": np.array([[32, 32, 0, 0, 32, -5]], np.float32)}, r"each must be in \[0"),
                            ({"text_embeds": np.zeros((1, 15), np.float32)}, r"text_embeds must be \(batch=1, 16\)"),
                            ({"time_ids": None}, r"missing input 'time_ids'")]:
        req = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(AdpdmError, match=pattern) as err:
            unet.check(req)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- export-triton


def test_an_sdxl_repository_validates_and_generate_answers_a_prompt(build, pipe, runner, text, tmp_path, monkeypatch):
    """The repository copies tokenizer_2/ and text_encoder_2/ (no pickles), its configs take the added
    inputs, validate_repository checks both encoders, and its generate model answers a prompt (and a
    bad time_ids beside it in one line) as `adpdm serve` does."""
    pytest.importorskip("tritonclient.grpc", reason="validating config.pbtxt needs tritonclient[grpc]")
    from engines.triton_repository import validate_repository, write_repository
    from test_triton_repository import _generate_model

    (pipe / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"never copied")
    try:
        repo = write_repository(build, tmp_path / "repo", platform="onnxruntime", max_batch=4,
                                limits={"max_n": 4, "max_steps": 20})
    finally:
        (pipe / "text_encoder_2" / "pytorch_model.bin").unlink()
    cfgs = validate_repository(repo)
    dims = {m: {t.name: list(t.dims) for t in cfgs[m].input} for m in ("unet_g0", "generate")}
    assert dims["unet_g0"]["text_embeds"] == [16] and dims["unet_g0"]["time_ids"] == [6]
    assert dims["generate"]["text_embeds"] == [-1, 16] and dims["generate"]["time_ids"] == [-1, 6]
    assert {t.name for t in cfgs["generate"].input if t.optional} >= {"text_embeds", "time_ids", "prompt"}
    copied = repo / "generate" / "1" / "pipeline"
    assert sorted(p.name for p in copied.iterdir()) == ["model_index.json", "text_encoder", "text_encoder_2",
                                                         "tokenizer", "tokenizer_2", "vae"]
    assert not (copied / "text_encoder_2" / "pytorch_model.bin").exists()

    gen, pb = _generate_model(repo, monkeypatch)

    def req(**kw):
        return {k: pb.Tensor(k, np.asarray(v, dtype=np.object_ if isinstance(v[0], bytes) else None))
                for k, v in kw.items()}

    good = req(seed=[5], n=[2], steps=[3], prompt=[PROMPT.encode()], guidance_scale=np.array([3.0]))
    bad = req(seed=[5], n=[2], steps=[3], prompt=[PROMPT.encode()], time_ids=np.zeros((1, 5), np.float32))
    r_good, r_bad = gen.execute([good, bad])
    assert r_bad.has_error() and r_bad.error().message() == "time_ids must be (1 or n=2, 6), got shape (1, 5)"
    assert not r_good.has_error()
    ref = _reference(runner, text, PROMPT, 3.0, 2, 3, 5).numpy()
    np.testing.assert_allclose(r_good.output_tensors[0].as_numpy(), ref, atol=1e-5)

    shutil.rmtree(copied / "tokenizer_2")
    with pytest.raises(AdpdmError, match=r"lacks tokenizer_2/ \(an SDXL pipeline needs"):
        validate_repository(repo)
    cfg = (repo / "generate" / "config.pbtxt").read_text()
    (repo / "generate" / "config.pbtxt").write_text(cfg.replace('name: "time_ids"', 'name: "time_idz"'))
    shutil.copytree(pipe / "tokenizer_2", copied / "tokenizer_2")
    with pytest.raises(AdpdmError, match=r"generate's config.pbtxt lacks the build's conditioning input\(s\) \['time_ids'\]"):
        validate_repository(repo)


# --------------------------------------------------------------------------- over the network


@pytest.fixture(scope="module")
def server(runner):
    pytest.importorskip("pytriton", reason="serving needs the `serve` extra (nvidia-pytriton, numpy<2)")
    pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[http,grpc]")
    srv = AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=0, limits=LIMITS)
    assert srv.text is not None
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_prompt_request_equals_adpdm_sample(server, runner, text, build, tmp_path):
    """Same prompt, seed, steps, guidance: the served images are `adpdm sample BUILD --prompt`'s
    (float32 to 1e-5 against the same library calls in process; the PNG `adpdm generate --prompt`
    writes is byte-identical to `adpdm sample`'s)."""
    from PIL import Image

    from adpdm_export.cli import main
    from engines.serving_client import AdpdmClient

    with AdpdmClient(server.grpc_url, timeout_s=60) as c:
        got = c.generate(seed=1, n=2, steps=3, prompt=PROMPT, guidance_scale=3.0)
    ref = _reference(runner, text, PROMPT, 3.0, 2, 3, 1).numpy()
    assert got.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    common = ["--n", "2", "--steps", "3", "--seed", "1", "--scale", "1", "--prompt", PROMPT, "--guidance-scale", "3"]
    assert main(["sample", str(build), "--backend", "ort", "--out", str(tmp_path / "s.png"), *common]) == 0
    assert main(["generate", "--url", server.http_url, "--out", str(tmp_path / "g.png"), *common]) == 0
    sampled, served = (np.asarray(Image.open(tmp_path / f)) for f in ("s.png", "g.png"))
    assert np.array_equal(sampled, served)


def test_generate_with_embeddings_and_time_ids_equals_in_process(server, runner, text):
    from engines.serving_client import AdpdmClient

    e = _embeds(1, seed=4)
    ids = np.array([48, 40, 8, 0, 32, 32], np.float32)
    with AdpdmClient(server.http_url, timeout_s=60) as c:
        got = c.generate(seed=2, n=2, steps=2, time_ids=ids, **e)
    cond = {k: torch.from_numpy(v).expand(2, *v.shape[1:]) for k, v in e.items()}
    cond["time_ids"] = torch.from_numpy(ids).expand(2, -1)
    ref = generate_images(runner, 2, 2, 2, cond=cond, decode=text.decode).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unet_requests_with_added_inputs_equal_the_runner_and_bad_ones_are_one_line(server, runner, protocol):
    """A good unet request and three bad ones at once (through the dynamic batcher): 400 /
    INVALID_ARGUMENT, one line each; the good one equals the in-process runner's prediction."""
    from engines.serving_client import AdpdmClient

    url = server.http_url if protocol == "http" else server.grpc_url
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([900, 20])  # two groups
    e = {k: torch.from_numpy(v) for k, v in _embeds(2, seed=7).items()}
    ids = torch.tensor([TIME_IDS, [64, 64, 16, 16, 32, 32]])
    want = runner(x, t, **e, time_ids=ids).numpy()
    bad = {1: dict(time_ids=ids[:, :5]), 2: dict(time_ids=-ids), 3: dict(text_embeds=torch.full((2, 16), float("nan")))}
    barrier = threading.Barrier(4)
    results, errors = {}, {}

    def worker(i):
        with AdpdmClient(url, timeout_s=60) as c:
            barrier.wait(30)
            try:
                results[i] = c.predict(x, t, **{**e, "time_ids": ids, **bad.get(i, {})})
            except AdpdmError as err:
                errors[i] = str(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    assert set(errors) == {1, 2, 3} and set(results) == {0}, (errors, list(results))
    for i, pattern in {1: r"time_ids", 2: r"each must be in \[0, 65536\]", 3: r"text_embeds contains NaN"}.items():
        assert re.search(pattern, errors[i]) and "\n" not in errors[i] and "Traceback" not in errors[i], errors[i]
    np.testing.assert_allclose(results[0], want, atol=1e-5)
