"""Bounded load test of `adpdm serve` on loopback: concurrent clients, mixed timesteps, model `unet`.

    python tools/load_test.py BUILD_DIR [--clients 8] [--requests 400] [--protocol http|grpc]
    python tools/load_test.py --url http://127.0.0.1:8000 --requests 400   # a server already running

With BUILD_DIR it starts the server in this process on 127.0.0.1 (free ports), sends the load,
checks every answer against the in-process runner (first --check answers), prints a markdown
table (p50/p99 latency, throughput, executed batch sizes, batches that mixed timestep groups,
failed requests) and stops the server. Only loopback URLs are accepted; the run is bounded by
--requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _remote_stats(url: str) -> dict[int, int]:
    """Executed batch sizes from Triton's statistics API (PyTriton restricts it: then {})."""
    from engines.serving_client import AdpdmClient

    with AdpdmClient(url) as c:
        try:
            return c.batch_stats("unet")
        except Exception as e:
            print(f"statistics API unavailable ({str(e)[:80]})", file=sys.stderr)
            return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", nargs="?", help="build folder (starts a server here); or give --url")
    ap.add_argument("--url", help="a running server (loopback only)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1, help="items per request")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads of the server (0: default)")
    ap.add_argument("--check", type=int, default=50, help="compare this many answers with the in-process runner")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 10000:
        ap.error("--clients must be in [1, 64] and --requests in [1, 10000]")

    import torch

    from engines.serving import AdpdmServer, ServeLimits
    from engines.serving_client import AdpdmClient

    server = runner = None
    if args.build:
        from engines.runner import TimestepDispatchRunner

        runner = TimestepDispatchRunner(args.build, backend="ort", threads=args.threads or None)
        server = AdpdmServer(runner=runner, http_port=0, grpc_port=0, metrics_port=0,
                             limits=ServeLimits(max_batch=args.max_batch, max_queue_delay_us=args.queue_delay_us))
        server.start()
        url = server.http_url if args.protocol == "http" else server.grpc_url
        shape, T = runner.sample_shape, runner.num_train_timesteps
    elif args.url:
        host = urlparse(args.url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            ap.error("load tests target loopback only")
        url = args.url
        with AdpdmClient(url) as c:
            cfg = c._client.get_model_metadata("unet")
            dims = cfg["inputs"][0]["shape"] if isinstance(cfg, dict) else list(cfg.inputs[0].shape)
        shape, T = tuple(int(d) for d in dims[1:]), 1000
    else:
        ap.error("give BUILD_DIR or --url")

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((args.requests, args.batch, *shape), dtype=np.float32)
    ts = rng.integers(0, T, size=(args.requests, args.batch))
    lat = np.full(args.requests, np.nan)
    outs: dict[int, np.ndarray] = {}
    failures: list[str] = []
    nxt = iter(range(args.requests))
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def worker():
        with AdpdmClient(url, timeout_s=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    y = c.predict(xs[i], ts[i])
                    lat[i] = time.perf_counter() - t0
                    if i < args.check:
                        outs[i] = y
                except Exception as e:
                    failures.append(f"{i}: {e}")

    try:
        before = dict(server.stats.batch_sizes) if server is not None else _remote_stats(url)
        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        t_start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t_start
        after = dict(server.stats.batch_sizes) if server is not None else _remote_stats(url)
        batches = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0) > 0}
        mismatches = 0
        if runner is not None:
            for i, y in outs.items():
                ref = runner(torch.from_numpy(xs[i]), torch.from_numpy(ts[i])).numpy()
                mismatches += int(not np.allclose(y, ref, atol=1e-5))
        done = int(np.isfinite(lat).sum())
        ms = lat[np.isfinite(lat)] * 1000
        executed = sum(batches.values())
        items = sum(b * n for b, n in batches.items())
        mixed = None
        if server is not None:
            g = server.stats.groups_per_batch
            mixed = sum(n for k, n in g.items() if k > 1)
        rows = [
            ("requests (items each)", f"{args.requests} ({args.batch})"),
            ("concurrent clients", args.clients),
            ("protocol", args.protocol if args.build else urlparse(url).scheme),
            ("completed / failed / not sent", f"{done} / {len(failures)} / {args.requests - done - len(failures)}"),
            ("latency p50 / p90 / p99 (ms)", " / ".join(f"{np.percentile(ms, q):.1f}" for q in (50, 90, 99)) if done else "-"),
            ("throughput (requests/s)", f"{done / wall:.1f}"),
            ("executed batches (size: count)", ", ".join(f"{b}: {n}" for b, n in sorted(batches.items()))),
            ("mean executed batch", f"{items / executed:.2f}" if executed else "-"),
            ("batches that mixed timestep groups", "-" if mixed is None else f"{mixed} of {executed}"),
            ("answers checked against the in-process runner", f"{len(outs)} ({mismatches} mismatches)" if runner else "-"),
            ("wall time (s)", f"{wall:.1f}"),
        ]
        print("| measure | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        for f in failures[:5]:
            print("failure:", f, file=sys.stderr)
        return 1 if failures or mismatches or done < args.requests else 0
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
