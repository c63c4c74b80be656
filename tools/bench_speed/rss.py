"""Part "rss": resident memory of the runner, G = 1 vs G = 4, each configuration in a fresh
interpreter (`python -m tools.bench_speed --rss-child BUILD --rss-config NAME`)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .common import ROOT, log
from .models import NOPREPACK, ModelBench, build_ours, calib_trajectories

PER_GROUP = {"sessions": "per-group"}
RSS_CONFIGS = {
    # name -> (runner ort_options, share the INT8 weights behind DequantizeLinear too)
    "default": ({}, False),
    "per-group": (PER_GROUP, False),
    "prepacking-off": ({**PER_GROUP, "session_config": NOPREPACK}, False),
    "prepacking-off+shared-int8": ({**PER_GROUP, "session_config": NOPREPACK}, True),
}
RSS_NOTES = {
    "default": "the runner as shipped: ONE onnxruntime session for all groups (engines/ort_one_session.py: the shared "
               "graph optimized once at export, group constants fed as inputs, weights pre-packed once)",
    "per-group": "the runner with ort_options={'sessions': 'per-group'}: one session per group graph (OrtGroupSessions: "
                 "level all, shared float weights and arena), the default before issue 16",
    "prepacking-off": "per-group sessions with session.disable_prepacking=1 (runner ort_options)",
    "prepacking-off+shared-int8": "experiment: prepacking off AND the INT8 weights behind DequantizeLinear handed to "
                                  "every session from the one memory map (engines/ort_group_sessions.py excludes "
                                  "them today; patched in the child process only)",
}


def rss_child(args) -> None:
    """One configuration in this fresh interpreter: load the runner, run every group, report MiB above the baseline."""
    import numpy as np  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch

    import engines.ort_group_sessions as ogs
    from engines.runner import TimestepDispatchRunner
    from tools.measure_ort_rss import pss_mib, status_mib

    torch.set_num_threads(args.threads)
    ort_options, share_int8 = RSS_CONFIGS[args.rss_config]
    if share_int8:
        ogs._dequantize_only = lambda graph: set()  # bench-only experiment, see RSS_NOTES
    r0, p0 = status_mib("VmRSS"), pss_mib()
    t0 = time.perf_counter()
    runner = TimestepDispatchRunner(args.rss_child, backend="ort", threads=args.threads, target="ort",
                                    verify="size", ort_options=dict(ort_options))
    table = runner.manifest.timestep_to_group
    C, H, W = runner.sample_shape
    load_s = time.perf_counter() - t0
    r_load = status_mib("VmRSS")
    firsts = [table.index(k) for k in range(runner.num_groups)]
    batch = args.rss_batches[0]
    x = torch.randn((batch, C, H, W), generator=torch.Generator().manual_seed(0))
    tt = [torch.full((batch,), t, dtype=torch.int64) for t in firsts]
    cond = {}
    spec = runner.cond_specs.get("encoder_hidden_states")
    if spec:  # text-conditioned layouts (sd15*): random embeddings
        cond["encoder_hidden_states"] = torch.randn((batch, spec.get("sequence_length", 77), spec["dim"]),
                                                    generator=torch.Generator().manual_seed(1))
    for t in tt:
        runner(x, t, **cond)
    r_run = status_mib("VmRSS")
    times = []
    for i in range(args.rss_reps):
        t1 = time.perf_counter()
        runner(x, tt[i % len(tt)], **cond)
        times.append((time.perf_counter() - t1) * 1e3)
    print(json.dumps({
        "config": args.rss_config, "G": runner.num_groups, "batch": batch, "rss_base_mib": round(r0, 1),
        "load_mib": round(r_load - r0, 1), "after_first_runs_mib": round(r_run - r0, 1),
        "steady_mib": round(status_mib("VmRSS") - r0, 1), "pss_steady_mib": round(pss_mib() - p0, 1),
        "peak_mib": round(status_mib("VmHWM") - r0, 1), "load_s": round(load_s, 2),
        "latency_ms": [round(v, 3) for v in times], "latency_ms_median": round(statistics.median(times), 3),
        "backend_class": type(runner.group_backend).__name__,
        "shared_bytes_per_session": (int(runner.group_backend.sessions.shared_bytes)
                                     if hasattr(runner.group_backend, "sessions") else None),
    }), flush=True)


def run_rss(mb: ModelBench, args) -> dict:
    """G = 1 and G = 4 builds of the same model; every (batch, config, G) in its own interpreter."""
    if args.groups not in mb.builds:
        return {"status": "failed", "reason": "no G-group build of ours", "model": mb.name}
    if 1 not in mb.builds:
        traj = calib_trajectories(mb.loaded, args.calib_samples, args.calib_steps)
        mb.builds[1], _ = build_ours(mb.loaded, traj, 1, mb.work / "build-g1")
    runs = []
    for batch in args.rss_batches:
        for config in args.rss_configs:
            for G in (1, args.groups):
                cmd = [sys.executable, "-m", "tools.bench_speed", "--rss-child", str(mb.builds[G]), "--rss-config",
                       config, "--threads", str(args.threads), "--rss-batches", str(batch), "--rss-reps", str(args.rss_reps)]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), check=False)
                if r.returncode != 0:
                    runs.append({"config": config, "G": G, "batch": batch, "status": "failed",
                                 "reason": r.stderr.strip()[-600:]})
                    log(f"rss {config} G={G} b{batch} failed: {r.stderr.strip()[-300:]}")
                    continue
                rec = json.loads(r.stdout.strip().splitlines()[-1])
                rec["status"] = "ok"
                runs.append(rec)
                log(f"rss b{batch} {config} G={G}: steady {rec['steady_mib']} MiB (after load {rec['load_mib']}), "
                    f"median {rec['latency_ms_median']} ms")
    summary = []
    for batch in args.rss_batches:
        for config in args.rss_configs:
            rs = {r["G"]: r for r in runs if r["config"] == config and r["batch"] == batch and r.get("status") == "ok"}
            if 1 not in rs or args.groups not in rs:
                continue
            a, b = rs[1], rs[args.groups]
            summary.append({
                "config": config, "batch": batch, "note": RSS_NOTES[config],
                "G1_mib": a["steady_mib"], "G4_mib": b["steady_mib"],
                "ratio": round(b["steady_mib"] / a["steady_mib"], 3) if a["steady_mib"] > 0 else None,
                "per_extra_group_mib": round((b["steady_mib"] - a["steady_mib"]) / max(args.groups - 1, 1), 1),
                "load_G1_mib": a["load_mib"], "load_G4_mib": b["load_mib"],
                "load_per_extra_group_mib": round((b["load_mib"] - a["load_mib"]) / max(args.groups - 1, 1), 1),
                "latency_ms_median_G1": a["latency_ms_median"], "latency_ms_median_G4": b["latency_ms_median"]})
    weights = mb.builds[args.groups] / "unet.weights.data"
    return {"status": "ok", "model": mb.name, "groups": args.groups, "batches": args.rss_batches, "reps": args.rss_reps,
            "weights_file_mib": round(weights.stat().st_size / 2**20, 2) if weights.is_file() else None,
            "baseline": "RSS of the child after importing torch, numpy, onnxruntime and engines.runner",
            "runs": runs, "summary": summary}
