"""Serving: Triton (PyTriton) on loopback, models `unet` and `generate`, HTTP and gRPC, bad requests, shutdown.

One server for the module (a tiny 3-group build whose group graphs add 0/10/20 to the
output, so a wrong dispatch is visible). Tests that need PyTriton/tritonclient skip with
the reason where the `serve` extra is not installed; the request-splitting logic is also
tested without Triton.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.errors import AdpdmError
from engines.serving import (AdpdmServer, ServeLimits, UnetModel, free_port, generate_images, is_loopback,
                             resolve_host)
from engines_fixtures import make_build

LIMITS = ServeLimits(max_batch=8, max_queue_delay_us=20000, max_n=4, max_steps=20, exit_timeout_s=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "build"
    make_build(folder, num_groups=3)
    return folder


@pytest.fixture(scope="module")
def runner(build):
    from engines.runner import TimestepDispatchRunner

    with TimestepDispatchRunner(build, backend="ort", threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def server(runner):
    pytest.importorskip("pytriton", reason="serving needs the `serve` extra (nvidia-pytriton, numpy<2)")
    pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[http,grpc]")
    srv = AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=0, limits=LIMITS)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["http", "grpc"])
def client(server, request):
    from engines.serving_client import AdpdmClient

    url = server.http_url if request.param == "http" else server.grpc_url
    with AdpdmClient(url, timeout_s=60) as c:
        yield c


def _x(B, shape, seed=0):
    return torch.randn((B, *shape), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- without Triton


def test_unet_model_splits_a_mixed_batch_back_per_request(runner):
    """Three requests at timesteps in different groups, one runner call, each gets its own slice."""
    m = UnetModel(runner, LIMITS)
    reqs = [
        {"sample": _x(2, runner.sample_shape, 1).numpy(), "timestep": np.array([[10], [900]], np.int64)},
        {"sample": _x(1, runner.sample_shape, 2).numpy(), "timestep": np.array([[300]], np.int64)},
        {"sample": _x(3, runner.sample_shape, 3).numpy(), "timestep": np.array([[999], [0], [500]], np.int64)},
    ]
    out = m(reqs)
    assert [o["out_sample"].shape[0] for o in out] == [2, 1, 3]
    for r, o in zip(reqs, out):
        ref = runner(torch.from_numpy(r["sample"]), torch.from_numpy(r["timestep"].reshape(-1))).numpy()
        np.testing.assert_allclose(o["out_sample"], ref, atol=1e-5)
    assert m.stats.batch_sizes == {6: 1} and m.stats.groups_per_batch == {3: 1}


def test_unet_model_names_the_bad_request(runner):
    m = UnetModel(runner, LIMITS)
    good = {"sample": _x(1, runner.sample_shape).numpy(), "timestep": np.array([[10]], np.int64)}
    bad = {"sample": _x(1, runner.sample_shape).numpy(), "timestep": np.array([[1000]], np.int64)}
    with pytest.raises(AdpdmError, match=r"request 1 of the batch: timestep 1000 is outside \[0, 1000\)"):
        m([good, bad])


def test_non_loopback_host_needs_an_explicit_flag(runner):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(AdpdmError, match="refusing to listen on 0.0.0.0"):
        AdpdmServer(runner=runner, host="0.0.0.0")


def test_limits_are_checked():
    with pytest.raises(AdpdmError, match="max_n must be >= 1"):
        ServeLimits(max_n=0)


# --------------------------------------------------------------------------- over the network


def test_unet_matches_the_in_process_runner(server, client, runner):
    x = _x(5, runner.sample_shape, 7)
    t = torch.tensor([999, 10, 300, 650, 0])  # all three groups, not in group order
    got = client.predict(x, t)
    np.testing.assert_allclose(got, runner(x, t).numpy(), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == tuple(x.shape)


def test_generate_matches_in_process_sampling(server, client, runner):
    got = client.generate(seed=5, n=2, steps=6)
    ref = generate_images(runner, seed=5, n=2, steps=6).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    got_ddpm = client.generate(seed=5, n=1, steps=4, scheduler="ddpm")
    np.testing.assert_allclose(got_ddpm, generate_images(runner, 5, 1, 4, "ddpm").numpy(), atol=1e-5)


def test_concurrent_clients_at_different_timesteps_are_batched_and_each_gets_its_own_answer(server, runner):
    """8 clients, each at its own timesteps (all groups): the batcher mixes them, answers stay exact."""
    from engines.serving_client import AdpdmClient

    before = dict(server.stats.groups_per_batch)
    jobs = [(i, j) for i in range(8) for j in range(4)]
    xs = {k: _x(1, runner.sample_shape, 100 + 10 * k[0] + k[1]) for k in jobs}
    ts = {k: torch.tensor([(k[0] * 131 + k[1] * 257) % 1000]) for k in jobs}
    results, errors = {}, []

    def worker(i):
        try:
            with AdpdmClient(server.http_url if i % 2 else server.grpc_url) as c:
                for j in range(4):
                    results[(i, j)] = c.predict(xs[(i, j)], ts[(i, j)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert len(results) == len(jobs)
    for k in jobs:
        np.testing.assert_allclose(results[k], runner(xs[k], ts[k]).numpy(), atol=1e-5)
    mixed = {g: n - before.get(g, 0) for g, n in server.stats.groups_per_batch.items() if g > 1}
    assert sum(mixed.values()) > 0, f"no executed batch mixed groups: {dict(server.stats.groups_per_batch)}"


BAD_UNET = [
    ("float64 sample", lambda s: dict(sample=np.zeros((1, *s), np.float64), timestep=[[1]]), r"(?i)FP64|data-type|datatype"),
    ("wrong channels", lambda s: dict(sample=np.zeros((1, s[0] + 1, *s[1:]), np.float32), timestep=[[1]]), r"(?i)shape"),
    ("timestep out of range", lambda s: dict(sample=np.zeros((1, *s), np.float32), timestep=[[1000]]), r"outside \[0, 1000\)"),
    ("negative timestep", lambda s: dict(sample=np.zeros((1, *s), np.float32), timestep=[[-1]]), r"outside \[0, 1000\)"),
    ("NaN sample", lambda s: dict(sample=np.full((1, *s), np.nan, np.float32), timestep=[[3]]), r"NaN or inf"),
    ("float timestep", lambda s: dict(sample=np.zeros((1, *s), np.float32), timestep=[[3.0]]), r"(?i)FP64|data-type|datatype"),
    ("batch above max", lambda s: dict(sample=np.zeros((9, *s), np.float32), timestep=[[1]] * 9), r"(?i)batch"),
    ("missing timestep", lambda s: dict(sample=np.zeros((1, *s), np.float32)), r"(?i)timestep"),
]


@pytest.mark.parametrize("case", BAD_UNET, ids=[c[0] for c in BAD_UNET])
def test_bad_unet_requests_get_error_responses(server, client, runner, case):
    _, make, pattern = case
    inputs = {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in make(runner.sample_shape).items()}
    with pytest.raises(AdpdmError, match=pattern):
        client.infer("unet", inputs, ("out_sample",))


BAD_GENERATE = [
    ("n above max", dict(n=5), r"n must be in \[1, 4\]"),
    ("zero steps", dict(steps=0), r"steps must be in \[1, 20\]"),
    ("steps above max", dict(steps=21), r"steps must be in \[1, 20\]"),
    ("negative seed", dict(seed=-3), r"seed must be in"),
    ("float seed", dict(seed=np.array([1.5], np.float32)), r"(?i)FP32|data-type|datatype"),
    ("string seed", dict(seed=np.array([b"7"], np.object_)), r"(?i)BYTES|data-type|datatype"),
    ("two seeds", dict(seed=np.array([1, 2], np.int64)), r"(?i)seed must hold exactly one value|shape"),
    ("unknown scheduler", dict(scheduler=np.array([b"euler"], np.object_)), r"unknown scheduler 'euler'"),
]


@pytest.mark.parametrize("case", BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_requests_get_error_responses(server, client, case):
    _, override, pattern = case
    inputs = {"seed": np.array([0], np.int64), "n": np.array([1], np.int64), "steps": np.array([2], np.int64)}
    for k, v in override.items():
        inputs[k] = v if isinstance(v, np.ndarray) else np.array([v], np.int64)
    with pytest.raises(AdpdmError, match=pattern):
        client.infer("generate", inputs, ("images",))


def test_server_survives_bad_requests(server, client, runner):
    assert server.is_alive() and client.is_ready()
    x = _x(1, runner.sample_shape)
    np.testing.assert_allclose(client.predict(x, [42]), runner(x, torch.tensor([42])).numpy(), atol=1e-5)


def test_generate_cli_writes_png(server, tmp_path):
    from adpdm_export.cli import main

    out = tmp_path / "g.png"
    assert main(["generate", "--url", server.http_url, "--n", "2", "--steps", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def _wait_group_gone(pgid: int, timeout_s: float) -> list[str]:
    """Wait until no process is left in the group (tritonserver, backend stubs); else list them."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        time.sleep(0.2)
    out = subprocess.run(["ps", "-o", "pid,etimes,cmd", "-g", str(pgid)], capture_output=True, text=True).stdout
    return out.strip().splitlines()[1:]


def test_serve_cli_stops_on_sigterm_without_orphans(build, tmp_path):
    """`adpdm serve --host localhost` in its own process group: ready (localhost resolves to 127.0.0.1),
    SIGTERM, exit 0 within seconds, nothing left in the group."""
    pytest.importorskip("pytriton", reason="serving needs the `serve` extra (nvidia-pytriton, numpy<2)")
    from engines.serving_client import AdpdmClient

    port = free_port()
    cmd = [sys.executable, "-m", "adpdm_export.cli", "serve", str(build), "--host", "localhost", "--http-port", str(port),
           "--grpc-port", "0", "--metrics-port", "0", "--exit-timeout", "2", "--threads", "1"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = AdpdmClient(f"http://127.0.0.1:{port}")
        deadline = time.time() + 40
        while not client.models_ready():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.time() < deadline, "server did not become ready in 40 s"
            time.sleep(0.3)
        assert client.generate(seed=1, n=1, steps=2).shape[0] == 1  # client connection stays open
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, (tmp_path / "serve.log").read_text()[-2000:]
        assert time.time() - t0 < 15
        client.close()
        left = _wait_group_gone(proc.pid, 10)
        assert not left, f"processes left in the server's group after exit: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# --------------------------------------------------------------------------- issue 17: the server's front


def _post_json(server, body, model="unet", raw: bytes = None):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=raw if raw is not None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _json_unet(shape, data, t=5):
    return {"inputs": [{"name": "sample", "datatype": "FP32", "shape": list(shape), "data": data},
                       {"name": "timestep", "datatype": "INT64", "shape": [1, 1], "data": [t]}]}


def _assert_one_clean_line(text):
    assert "\n" not in text and "\\n" not in text, text
    assert "Traceback" not in text and 'File "' not in text and str(REPO) not in text and "site-packages" not in text, text


def test_guard_refuses_a_huge_declared_shape_before_decoding_anything(runner):
    """Without Triton: the declared shape is checked before any data is read or allocated."""
    import json

    from engines.serving import GenerateModel
    from engines.serving_guard import RequestGuard, one_line

    guard = AdpdmServer(runner=runner, limits=LIMITS, http_port=0, grpc_port=0, metrics_port=0).request_guard(
        UnetModel(runner, LIMITS), GenerateModel(runner, LIMITS))
    assert isinstance(guard, RequestGuard)
    body = json.dumps(_json_unet([1000000000, 1, 16, 16], [0.0])).encode()
    with pytest.raises(AdpdmError, match=r"batch of 1000000000 is above the server's maximum batch 8"):
        guard.check_http("unet", body, None)
    body = json.dumps(_json_unet([1, 1, 16, 16 * 100000], [0.0])).encode()
    with pytest.raises(AdpdmError, match=r"holds more than the 2048 values"):
        guard.check_http("unet", body, None)
    body = json.dumps(_json_unet([1, 1, 16, 16], [0.0] * 3)).encode()
    with pytest.raises(AdpdmError, match=r"3 values for shape \[1, 1, 16, 16\]"):
        guard.check_http("unet", body, None)
    assert guard.max_body_bytes < 2**20
    tb = 'Traceback (most recent call last):\n  File "/x/y.py", line 1\nengines.errors.AdpdmError: timestep 7 is bad\n'
    assert one_line(tb) == ("timestep 7 is bad", True)
    assert one_line('Traceback (most recent call last):\n  File "/x/y.py"\nKeyError: 3')[1] is False


def test_oversized_shape_is_refused_and_the_server_keeps_serving(server, runner):
    """Issue 17: one request declaring shape [1e9, 1, 16, 16] with one value aborted tritonserver."""
    C, H, W = runner.sample_shape
    status, text = _post_json(server, _json_unet([1000000000, C, H, W], [0.0]))
    assert status == 400 and "maximum batch" in text, (status, text)
    status, text = _post_json(server, _json_unet([1, C, H, W * 1000000], [0.0]))
    assert status == 400 and "holds more than" in text, (status, text)
    import socket

    with socket.create_connection(("127.0.0.1", server.ports["http"]), timeout=30) as s:  # body above the limit
        s.sendall(b"POST /v2/models/unet/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
        head = b""
        while chunk := s.recv(4096):  # the server closes the connection after its answer
            head += chunk
        head = head.decode()
    assert head.startswith("HTTP/1.1 413") and "limit of" in head, head
    # gRPC: the same declared shape in a raw ModelInferRequest
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name="unet")
    req.inputs.add(name="sample", datatype="FP32", shape=[1000000000, C, H, W])
    req.inputs.add(name="timestep", datatype="INT64", shape=[1, 1])
    req.raw_input_contents.extend([np.zeros(1, np.float32).tobytes(), np.array([5], np.int64).tobytes()])
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum batch" in info.value.details()
    req.raw_input_contents[0] = b"\0" * (8 * 2**20)  # a message above the limit
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # and a good request right after is answered
    x = _x(1, runner.sample_shape, 3)
    status, text = _post_json(server, _json_unet([1, C, H, W], x.reshape(-1).tolist(), t=42))
    assert status == 200, text
    assert server.is_alive()


def test_bad_value_is_a_400_with_one_line_and_no_traceback(server, runner):
    C, H, W = runner.sample_shape
    for data, t, pattern in [([0.0] * (C * H * W), 1000, r"timestep 1000 is outside \[0, 1000\)"),
                             ([float("nan")] * (C * H * W), 5, r"NaN or inf")]:
        status, text = _post_json(server, _json_unet([1, C, H, W], data, t))
        assert status == 400, (status, text)
        import json

        message = json.loads(text)["error"]
        assert re.search(pattern, message), message
        _assert_one_clean_line(message)
    status, text = _post_json(server, {"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [-1]},
                                                  {"name": "n", "datatype": "INT64", "shape": [1], "data": [1]},
                                                  {"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]}]},
                              model="generate")
    assert status == 400 and "seed must be in" in text, (status, text)
    _assert_one_clean_line(text)
    status, text = _post_json(server, {"inputs": []}, model="nope")
    assert status == 404 and "unknown model" in text


def test_a_prompt_to_an_unconditional_build_is_a_400_with_one_line(server, client):
    """The build serves no text: a prompt is refused in one line (HTTP 400 / INVALID_ARGUMENT), and
    unconditional generate requests are answered exactly as before (test_generate_matches_in_process_sampling)."""
    with pytest.raises(AdpdmError, match=r"prompt given, but this build's UNet takes no text") as e:
        client.generate(seed=0, n=1, steps=2, prompt="a cat")
    _assert_one_clean_line(str(e.value))
    status, text = _post_json(server, {"inputs": [
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [0]},
        {"name": "n", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]},
        {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]}]}, model="generate")
    assert status == 400 and "prompt given, but" in text, (status, text)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_values_batched_with_good_requests_fail_only_themselves(server, runner, protocol):
    """7 good + 1 bad (NaN, then timestep 1000) at once, 3 rounds: every good request succeeds."""
    from engines.serving_client import AdpdmClient

    url = server.http_url if protocol == "http" else server.grpc_url
    shape = runner.sample_shape
    for rnd in range(3):
        barrier = threading.Barrier(8)
        results, errors = {}, {}

        def worker(i):
            x = _x(1, shape, 1000 + 10 * rnd + i)
            t = [(i * 137 + rnd * 71) % 1000]
            bad = i == 7
            if bad:
                x = torch.full((1, *shape), float("nan")) if rnd % 2 == 0 else x
                t = [5] if rnd % 2 == 0 else [1000]
            with AdpdmClient(url, timeout_s=60) as c:
                barrier.wait(30)
                try:
                    results[i] = (c.predict(x, t), x, t)
                except AdpdmError as e:
                    errors[i] = str(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert set(errors) == {7}, errors
        assert re.search(r"NaN or inf|outside \[0, 1000\)", errors[7]) and "Traceback" not in errors[7]
        for i in range(7):
            got, x, t = results[i]
            np.testing.assert_allclose(got, runner(x, torch.tensor(t)).numpy(), atol=1e-5)


def test_host_names_resolve_or_are_refused_in_one_line(runner):
    assert resolve_host("localhost") == "127.0.0.1"
    assert resolve_host("127.0.0.1") == "127.0.0.1" and resolve_host("[::1]") == "::1"
    srv = AdpdmServer(runner=runner, host="localhost", http_port=0, grpc_port=0, metrics_port=0)
    assert srv.host == "127.0.0.1" and srv.http_url.startswith("http://127.0.0.1:")
    with pytest.raises(AdpdmError, match=r"--host 'no-such-host.invalid' does not resolve"):
        AdpdmServer(runner=runner, host="no-such-host.invalid")


def test_ports_out_of_range_or_in_use_are_one_line_before_starting(runner, build, capsys):
    import socket

    from adpdm_export.cli import main

    with pytest.raises(AdpdmError, match=r"--http-port must be in 1\.\.65535"):
        AdpdmServer(runner=runner, http_port=70000, grpc_port=0, metrics_port=0)
    with pytest.raises(AdpdmError, match=r"--grpc-port must be in 1\.\.65535"):
        AdpdmServer(runner=runner, http_port=0, grpc_port=-1, metrics_port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(AdpdmError, match=rf"--metrics-port {port} on 127.0.0.1: already in use"):
            AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=port)
        capsys.readouterr()
        assert main(["serve", str(build), "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --http-port {port} on 127.0.0.1: already in use", err
    assert main(["serve", str(build), "--http-port", "65536"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --http-port must be in 1..65535") and "\n" not in err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_generate_cli_without_a_server_or_past_its_timeout_is_one_line(tmp_path, capsys, protocol):
    pytest.importorskip("tritonclient.grpc", reason="the client needs tritonclient[http,grpc]")
    import socket

    from adpdm_export.cli import main

    out = tmp_path / "g.png"
    port = free_port()
    assert main(["generate", "--url", f"{protocol}://127.0.0.1:{port}", "--out", str(out), "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no server answers at {protocol}://127.0.0.1:{port}") and "\n" not in err, err
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.time()
        assert main(["generate", "--url", f"{protocol}://127.0.0.1:{port}", "--out", str(out), "--timeout", "1"]) == 2
        assert time.time() - t0 < 20
    err = capsys.readouterr().err.strip()
    assert err == f"error: {protocol}://127.0.0.1:{port}: no answer within 1 s (raise the timeout, e.g. `adpdm generate --timeout`)", err
    assert not out.exists()
