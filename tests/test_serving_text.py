"""Serving a build of a text-to-image pipeline (issue 14): `generate` takes a prompt and runs the
text encoder, the guided loop (2n runner items per step) and the VAE in the server.

The build is the tiny text pipeline's UNet as 3 group graphs (engines_fixtures.make_build, small
per-group offsets so a wrong dispatch shows) with the pipeline folder as its model source, as a
real build records it. Runs in the serve environment (PyTriton); the checks of the request
parsing also run without Triton.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from engines.errors import AdpdmError
from engines.serving import AdpdmServer, GenerateModel, ServeLimits, generate_images
from engines_fixtures import make_build
from tiny_models import save_text_pipeline, tiny_cond_unet

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = ServeLimits(max_batch=8, max_queue_delay_us=2000, max_n=4, max_steps=20, exit_timeout_s=2)
TEXT = {"encoder_hidden_states": {"dim": 24, "sequence_length": 8}}
PROMPT = "a handwritten seven"
LONG = "a photo of a cat a photo of a cat a photo of a cat"  # 12 tokens + 2 specials > the tokenizer's 8


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return save_text_pipeline(tmp_path_factory.mktemp("t2i") / "pipe")


@pytest.fixture(scope="module")
def build(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-text") / "build"
    make_build(folder, num_groups=3, conditioning=TEXT, unet=tiny_cond_unet(), offsets=[0.0, 0.05, 0.1],
               source=str(pipe))
    return folder


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


def _req(prompt=None, negative=None, guidance=None, n=2, steps=3, seed=1, **extra):
    r = {"seed": np.array([seed], np.int64), "n": np.array([n], np.int64), "steps": np.array([steps], np.int64)}
    if prompt is not None:
        r["prompt"] = np.array([prompt.encode()], np.object_)
    if negative is not None:
        r["negative_prompt"] = np.array([negative.encode()], np.object_)
    if guidance is not None:
        r["guidance_scale"] = np.array([guidance], np.float64)
    return {**r, **extra}


def _reference(runner, text, prompt, negative="", guidance=7.5, n=2, steps=3, seed=1):
    """What `adpdm sample BUILD --prompt` computes (the same library calls, in process)."""
    from engines.conditioning import default_condition
    from engines.text_pipeline import PromptRequest, guided_conditions

    g = guided_conditions(text.text_encoder, PromptRequest(prompt, negative, guidance), n,
                          default_condition(runner.manifest.model.conditioning, n))
    return generate_images(runner, seed, n, steps, "ddim", g.cond, g.guidance_scale, g.uncond, text.decode)


# --------------------------------------------------------------------------- without Triton


BAD_PROMPTS = [
    ("empty prompt", dict(prompt="  "), r"the prompt is empty"),
    ("guidance below 1", dict(prompt=PROMPT, guidance=0.5), r"guidance scale must be a number from 1"),
    ("guidance NaN", dict(prompt=PROMPT, guidance=float("nan")), r"guidance scale must be a number from 1"),
    ("guidance without prompt", dict(guidance=3.0, encoder_hidden_states=np.zeros((1, 8, 24), np.float32)),
     r"guidance_scale go\(es\) with a prompt"),
    ("prompt and embeddings", dict(prompt=PROMPT, encoder_hidden_states=np.zeros((1, 8, 24), np.float32)),
     r"give prompt or encoder_hidden_states, not both"),
    ("neither", dict(), r"missing input 'encoder_hidden_states' \(or give a prompt\)"),
    ("2n above the runner's batch", dict(prompt=PROMPT, n=4, steps=2), None),  # fine on onnxruntime: no profile
]


@pytest.mark.parametrize("case", BAD_PROMPTS, ids=[c[0] for c in BAD_PROMPTS])
def test_prompt_requests_are_checked_in_one_line(model, case):
    _, kw, pattern = case
    req = _req(**{k: v for k, v in kw.items() if k in ("prompt", "negative", "guidance", "n", "steps")},
               **{k: v for k, v in kw.items() if k == "encoder_hidden_states"})
    if pattern is None:
        model.parse(req)
        return
    with pytest.raises(AdpdmError, match=pattern) as e:
        model.parse(req)
    assert "\n" not in str(e.value)


def test_a_prompt_to_a_build_without_a_text_encoder_is_one_line(runner):
    with pytest.raises(AdpdmError, match=r"prompt given, but this build's UNet takes no text"):
        GenerateModel(runner, LIMITS).parse(_req(PROMPT))


def test_a_long_prompt_is_truncated_and_said_so(model, runner, text):
    images, notes = model.run(model.parse(_req(LONG, n=1, steps=2)))
    assert notes == ["the prompt is longer than the tokenizer's 8 tokens and was truncated"]
    assert images.shape == (1, 1, 32, 32)  # the VAE's pixels, not the 4x16x16 latents


def test_the_server_finds_the_pipeline_of_the_build_or_is_told_it(runner, build, tmp_path):
    auto = AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=0)
    assert auto.text is not None and str(auto.text.folder) == runner.manifest.model.source
    off = AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=0, pipeline=None)
    assert off.text is None
    with pytest.raises(AdpdmError, match="not a text-to-image pipeline folder"):
        AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=0, pipeline=tmp_path)


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


def test_a_prompt_request_equals_adpdm_sample(server, runner, text, build, tmp_path, capsys):
    """Same prompt, seed, steps: the server's images are `adpdm sample BUILD --prompt`'s (float32 to
    1e-5; the PNG `adpdm generate --prompt` writes is byte-identical to `adpdm sample`'s)."""
    from PIL import Image

    from adpdm_export.cli import main
    from engines.serving_client import AdpdmClient

    with AdpdmClient(server.grpc_url, timeout_s=60) as c:
        got = c.generate(seed=1, n=2, steps=3, prompt=PROMPT, negative_prompt="a photo of a cat", guidance_scale=4.0)
        assert c.notes == []
    ref = _reference(runner, text, PROMPT, "a photo of a cat", 4.0).numpy()
    assert got.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    unguided = _reference(runner, text, PROMPT, "", 1.0).numpy()
    assert np.abs(got - unguided).max() > 1e-3  # guidance and the negative prompt reached the loop

    common = ["--n", "2", "--steps", "3", "--seed", "1", "--scale", "1", "--prompt", PROMPT]
    assert main(["sample", str(build), "--backend", "ort", "--out", str(tmp_path / "s.png"), *common]) == 0
    assert main(["generate", "--url", server.http_url, "--out", str(tmp_path / "g.png"), *common]) == 0
    sampled, served = (np.asarray(Image.open(tmp_path / f)) for f in ("s.png", "g.png"))
    assert sampled.shape == (32 + 2, 2 * 32 + 3) and np.array_equal(sampled, served)


def test_truncation_is_in_the_response(server):
    from engines.serving_client import AdpdmClient

    with AdpdmClient(server.http_url, timeout_s=60) as c:
        c.generate(seed=0, n=1, steps=2, prompt=LONG, guidance_scale=1.0)
        assert c.notes == ["the prompt is longer than the tokenizer's 8 tokens and was truncated"]


def test_embeddings_still_work_on_a_text_server(server, runner, text):
    from engines.serving_client import AdpdmClient

    e = text.text_encoder.encode([PROMPT])[0]
    with AdpdmClient(server.http_url, timeout_s=60) as c:
        got = c.generate(seed=2, n=1, steps=2, encoder_hidden_states=e.numpy())
    ref = generate_images(runner, 2, 1, 2, cond={"encoder_hidden_states": e}, decode=text.decode).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_prompts_are_one_line_and_do_not_fail_a_good_request(server, runner, text, protocol):
    """A good prompt request and four bad ones at once: 400 / INVALID_ARGUMENT, one line each; the good one's
    images are exact."""
    from engines.serving_client import AdpdmClient

    url = server.http_url if protocol == "http" else server.grpc_url
    bad = {1: dict(prompt=""), 2: dict(prompt=PROMPT, guidance_scale=0.5), 3: dict(prompt=PROMPT, guidance_scale=float("nan")),
           4: dict(prompt=PROMPT, encoder_hidden_states=np.zeros((1, 8, 24), np.float32))}
    barrier = threading.Barrier(5)
    results, errors = {}, {}

    def worker(i):
        with AdpdmClient(url, timeout_s=60) as c:
            barrier.wait(30)
            try:
                results[i] = c.generate(seed=3, n=1, steps=3, **(bad.get(i) or dict(prompt=PROMPT)))
            except AdpdmError as e:
                errors[i] = str(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    assert set(errors) == {1, 2, 3, 4} and set(results) == {0}, (errors, list(results))
    for i, pattern in {1: "the prompt is empty", 2: "guidance scale must be a number from 1",
                       3: "guidance scale must be a number from 1", 4: "not both"}.items():
        assert re.search(pattern, errors[i]) and "\n" not in errors[i] and "Traceback" not in errors[i], errors[i]
    np.testing.assert_allclose(results[0], _reference(runner, text, PROMPT, n=1, steps=3, seed=3).numpy(), atol=1e-5)
