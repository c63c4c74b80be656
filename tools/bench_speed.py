"""Speed benchmark (issue 8): our CPU-profile group graphs through the runner vs the tools a
user would pick instead, on the DDPM-CIFAR10 UNet layout and the bundled reference model.

    .venv/bin/python tools/bench_speed.py                 # full: docs/bench_speed.json + docs/benchmarks.md
    .venv/bin/python tools/bench_speed.py --calib-time    # ... plus the full ADP-DM calibration time (long)
    .venv/bin/python tools/bench_speed.py --quick         # < 3 min on 2 cores; runs/bench-speed-quick.json
    .venv/bin/python tools/bench_speed.py --quick --out-json TMP/s.json --no-docs   # what a test runs

--quick: the reference model only, batches 1 and 4, a few calls; RSS at batch 4 on the reference
model; calibration timing on a tiny UNet; build-engine with tiny ADP-DM settings. It never
touches docs/: it writes the JSON and its "## Speed" section (<json>.md + PNG) beside the JSON.

Parts (each can be skipped; a skipped part keeps the section of the previous JSON, with its command):

* latency: batch 1 and 16, `--threads` (2) threads in torch and onnxruntime (intra-op, inter-op 1),
  all variants of one model in ONE process, interleaved round-robin (the start rotates every
  round), warm-up excluded; every raw time is kept. Variants: PyTorch eager FP32, onnxruntime
  FP32 (the FP ONNX graph), onnxruntime `quantize_static` QDQ (the ort_static peer's fastest
  graph), ModelOpt's exported QDQ graph on onnxruntime (modelopt_int8 peer), ours (the
  CPU-profile group graphs through `TimestepDispatchRunner`), plus diagnostic rows (our group
  graph in a plain session at onnxruntime's defaults; the runner with pre-packing off).
  Random weights are fine for speed: the kernels' cost does not depend on the values.
  Scales do not matter either, so every quantizer is calibrated on a small budget.
* dispatch: the runner vs a bare `session.run` of the same group session on the same inputs
  (interleaved), and the runner's own cost alone (its session replaced by one returning a
  precomputed output), as ms and % of a step.
* rss: resident memory of the runner with G = 1 and G = 4 over real builds of the 35.7M UNet, at
  batch 1 and 16, each in a fresh interpreter (`--rss-child`): as shipped, with onnxruntime's
  weight pre-packing off, and (experiment) pre-packing off plus the INT8 weights shared from the
  one memory map, to show where the per-group memory goes.
* calibration (`--calib-time`): full ADP-DM calibration (the CLI defaults: G = 4, 64 samples x
  100 DDIM steps) of the 35.7M-parameter UNet with random weights (a trained model is not
  needed for timing); quick mode: a tiny UNet with tiny settings.
* build: `build_engine` wall time per stage for the reference model (fresh out folder and
  trajectory cache, nothing reused).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tools"):  # the package, and bench_report beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DEFAULT_JSON = ROOT / "docs" / "bench_speed.json"
QUICK_JSON = ROOT / "runs" / "bench-speed-quick.json"
PLOT_NAME = "bench-speed-latency.png"
PEERS = (("ort_static", "ort-static-qdq"), ("modelopt_int8", "modelopt-qdq"))
VARIANT_LABELS = {
    "pytorch-fp32": "PyTorch eager FP32",
    "ort-fp32": "onnxruntime FP32",
    "ort-static-qdq": "onnxruntime quantize_static QDQ",
    "modelopt-qdq": "ModelOpt QDQ on onnxruntime",
    "ours": "ours: group graphs via the runner",
    "ours-plain-session": "(diag.) our group graph, plain session at onnxruntime defaults",
    "ours-noprepack": "(diag.) ours, runner with pre-packing off",
}
DIAGNOSTIC = ("ours-plain-session", "ours-noprepack")
TARGETS = {
    "speedup_b16": 2.5,  # ours >= 2.5x onnxruntime FP32 at batch 16
    "dispatch_pct": 1.0,  # runner overhead < 1% of a step
    "rss_ratio": 1.3,  # G=4 RSS <= 1.3x G=1
}
NOPREPACK = {"session.disable_prepacking": "1"}


def log(msg: str) -> None:
    print(f"[bench_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# ====================================================================== models


LAYOUTS: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32 (35.7M parameters); the same layout as tools/measure_ort_rss.py
    "ddpm-cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # tests/tiny_models.tiny_unet2d: quick-mode calibration timing only
    "tiny": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ),
}


def load_bench_model(name: str):
    """A `LoadedModel`: "reference" (bundled, trained) or a LAYOUTS entry with random weights (seed 0)."""
    import torch
    from diffusers import UNet2DModel

    from adpdm_export.model_loading import DEFAULT_SCHEDULER_CONFIG, LoadedModel, load_model

    if name == "reference":
        return load_model("reference")
    if name not in LAYOUTS:
        raise SystemExit(f"unknown model {name!r}: reference or one of {', '.join(LAYOUTS)}")
    torch.manual_seed(0)
    cfg = LAYOUTS[name]
    unet = UNet2DModel(**cfg).eval()
    unet.requires_grad_(False)
    size = int(cfg["sample_size"])
    return LoadedModel(unet=unet, scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG), source=f"{name} (random weights)",
                       kind="UNet2DModel", sample_size=(size, size), in_channels=int(cfg["in_channels"]),
                       out_channels=int(cfg["out_channels"]))


def params_m(unet) -> float:
    return round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)


# ====================================================================== onnxruntime helpers


def plain_session(path: Path, threads: int, spinning: bool = False, config: Optional[dict] = None):
    """An InferenceSession at onnxruntime's default optimization level ("all") with the benchmark's threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def session_feeds(session, x, t) -> dict:
    """numpy feeds for a UNet graph (sample / timestep; other inputs are not used by these models)."""
    import numpy as np

    feeds = {}
    for i in session.get_inputs():
        if i.name == "sample":
            feeds[i.name] = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        elif i.name == "timestep":
            feeds[i.name] = np.ascontiguousarray(t.numpy().astype(np.int64))
        else:
            raise RuntimeError(f"graph input {i.name!r} is not sample/timestep")
    return feeds


class _NullSession:
    """Stands in for an onnxruntime session and returns a precomputed output: the runner's own cost alone."""

    def __init__(self, real, out):
        self._inputs = real.get_inputs()
        self._out = out

    def get_inputs(self):
        return self._inputs

    def run(self, names, feeds):
        return [self._out]


# ====================================================================== model setup


class ModelBench:
    """One model's variants: name -> callable(call_index), plus what each needed or why it is missing."""

    def __init__(self, name: str, loaded, work: Path):
        self.name = name
        self.loaded = loaded
        self.work = work
        self.info: dict[str, dict[str, Any]] = {}
        self.runner = None
        self.builds: dict[int, Path] = {}
        self.timesteps: list[int] = []
        self.params_m = params_m(loaded.unet)
        self.traj_s: Optional[float] = None
        self.fp_graph: Optional[Path] = None
        self.fp_session = None
        self.plain = None  # our group-0 graph in a plain session (diagnostic)
        self.runner_noprepack = None  # the runner with pre-packing off (diagnostic)
        self.peer_sessions: dict[str, Any] = {}

    def ok(self, variant: str, setup_s: float, **extra) -> None:
        self.info[variant] = {"status": "ok", "setup_s": round(setup_s, 2), **extra}

    def missing(self, variant: str, status: str, reason: str, **extra) -> None:
        self.info[variant] = {"status": status, "reason": reason, **extra}
        log(f"{self.name}/{variant}: {status}: {reason}")


def calib_trajectories(loaded, samples: int, steps: int):
    from calibration.trajectories import generate_trajectories

    return generate_trajectories(loaded.unet, loaded.scheduler_config, num_samples=samples, num_steps=steps, seed=0,
                                 cond=loaded.default_condition(samples), cache_dir=None, model_sha=loaded.sha256)


def build_ours(loaded, traj, groups: int, out: Path) -> tuple[Path, dict]:
    """Calibrate (uniform-groups, minmax: scales do not matter for speed) and export the CPU profile
    into a build folder with a manifest; returns the folder and facts about the export."""
    from adpdm_export.qdq_export import export_qdq_for
    from calibration.pipeline import calibrate

    t0 = time.perf_counter()
    result = calibrate(loaded.unet, loaded.scheduler_config, method="uniform-groups", groups=groups,
                       trajectories=traj, stat="minmax")
    t1 = time.perf_counter()
    exp = export_qdq_for(loaded, result, out, profile="ort", check=False, lint=False, fusion=True)
    fusion = exp.fusion.get("ort", {})
    return out, {"groups": groups, "calibrate_s": round(t1 - t0, 2), "export_s": round(time.perf_counter() - t1, 2),
                 "fused": f"{fusion.get('fused_total')}/{fusion.get('total')}" if fusion else None,
                 "weights_mib": round(exp.weights.stat().st_size / 2**20, 2),
                 "timestep_ranges": exp.timestep_ranges}


def peer_graph(module: str, loaded, traj, work: Path) -> tuple[Path, dict]:
    """The peer's deployable QDQ graph (its fastest variant where it says which); raises with the reason."""
    import torch

    from calibration.qconfig import DEFAULT_FP_LAYERS
    from tools.bench_peers import CalibData, Scope, load_peer

    mod = load_peer(module)
    why = mod.unavailable()
    if why:
        raise _Unavailable(why)
    calib = CalibData(traj, batch_size=min(64, traj.num_samples))
    scope = Scope(w_bits=8, a_bits=8, fp_layers=tuple(DEFAULT_FP_LAYERS), conv_in_fp=True)
    unet = copy.deepcopy(loaded.unet)  # peers may rewrite the module in place (ModelOpt does)
    work.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"calib_forward_passes": calib.num_forward_passes}
    with torch.no_grad():
        if hasattr(mod, "fastest_qdq_graph"):
            got = mod.fastest_qdq_graph(unet, calib, scope, work, **_log_kw(mod.fastest_qdq_graph))
            pm = got if hasattr(got, "onnx_path") else None
            path = Path(pm.onnx_path if pm is not None else got)
            extra["peer_variant"] = (pm.extra.get("variant") if pm is not None else None) or "fastest_qdq_graph"
        else:
            variants = list(getattr(mod, "VARIANTS", {}) or [])
            variant = "minmax-wide" if "minmax-wide" in variants else (variants[0] if variants else None)
            pm = mod.quantize(unet, calib, scope, variant, work, **_log_kw(mod.quantize))
            path = pm.onnx_path
            extra["peer_variant"] = variant
    if pm is not None:
        extra["calibration_s"] = round(float(pm.calibration_s), 2)
        extra["notes"] = list(pm.notes)
    if path is None or not Path(path).is_file():
        raise _Unavailable("the peer made no deployable ONNX graph (PeerModel.onnx_path is empty)")
    return Path(path), extra


class _Unavailable(Exception):
    pass


def _log_kw(fn) -> dict:
    """log=... for peer functions that take it (their progress goes to stderr, not into our stdout)."""
    import inspect

    try:
        return {"log": log} if "log" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}


def setup_model(name: str, args, work: Path, timed: bool = True) -> ModelBench:
    """Load the model, export/quantize every variant (each failure is recorded, the rest goes on).
    timed=False: our build only (a model that only the RSS part uses)."""
    from adpdm_export.onnx_export import example_inputs, export_onnx
    from engines.runner import TimestepDispatchRunner

    loaded = load_bench_model(name)
    mb = ModelBench(name, loaded, work / name)
    mb.work.mkdir(parents=True, exist_ok=True)
    if timed:
        mb.ok("pytorch-fp32", 0.0)
        fp = mb.work / "fp" / "unet.onnx"
        try:
            t0 = time.perf_counter()
            export_onnx(loaded.unet, fp, example_inputs(loaded.sample_shape, loaded.conditioning, batch=2))
            mb.fp_graph = fp
            mb.ok("ort-fp32", time.perf_counter() - t0, graph="FP ONNX (TorchScript exporter, opset 19)")
        except Exception as e:
            log(traceback.format_exc())
            mb.missing("ort-fp32", "failed", _reason(e))

    log(f"{name}: calibration trajectories ({args.calib_samples} x {args.calib_steps} steps) for the quantizers")
    t0 = time.perf_counter()
    traj = calib_trajectories(loaded, args.calib_samples, args.calib_steps)
    mb.traj_s = round(time.perf_counter() - t0, 2)

    try:
        t0 = time.perf_counter()
        build, facts = build_ours(loaded, traj, args.groups, mb.work / f"build-g{args.groups}")
        mb.builds[args.groups] = build
        # the timesteps of a DDIM 50-step loop in sampling order: consecutive calls stay in one group and
        # switch groups as often as sampling does (G - 1 times per loop), not on every call
        mb.timesteps = sampling_timesteps(loaded.scheduler_config, 50)
        if timed:
            mb.runner = TimestepDispatchRunner(build, backend="ort", threads=args.threads, profile="ort")
        mb.ok("ours", time.perf_counter() - t0, **facts)
    except Exception as e:
        log(traceback.format_exc())
        mb.missing("ours", "failed", _reason(e))
    if not timed:
        return mb
    if mb.runner is not None:
        for variant, make in (
            ("ours-plain-session", lambda: plain_session(mb.builds[args.groups] / "unet.g0.ort.onnx", args.threads,
                                                         args.ort_spinning)),
            ("ours-noprepack", lambda: TimestepDispatchRunner(mb.builds[args.groups], backend="ort", threads=args.threads,
                                                              profile="ort", verify="size",
                                                              ort_options={"session_config": NOPREPACK})),
        ):
            if variant not in args.variants:
                continue
            try:
                t0 = time.perf_counter()
                obj = make()
                setattr(mb, "plain" if variant == "ours-plain-session" else "runner_noprepack", obj)
                mb.ok(variant, time.perf_counter() - t0, **({"graph": "unet.g0.ort.onnx for every call",
                                                              "optimization": "all (onnxruntime default)"}
                                                             if variant == "ours-plain-session" else
                                                             {"session_config": NOPREPACK}))
            except Exception as e:
                log(traceback.format_exc())
                mb.missing(variant, "failed", _reason(e))
    else:
        for variant in DIAGNOSTIC:
            mb.missing(variant, "failed", "ours did not build")
    if not mb.timesteps:
        mb.timesteps = sampling_timesteps(loaded.scheduler_config, 50)

    for module, variant in PEERS:
        if variant not in args.variants:
            continue
        try:
            t0 = time.perf_counter()
            path, extra = peer_graph(module, loaded, traj, mb.work / variant)
            mb.peer_sessions[variant] = plain_session(path, args.threads, args.ort_spinning)
            mb.ok(variant, time.perf_counter() - t0, graph=path.name, **extra)
        except ModuleNotFoundError as e:
            mb.missing(variant, "unavailable", f"peer module tools/bench_peers/{module}.py is missing ({_reason(e)})")
        except _Unavailable as e:
            mb.missing(variant, "unavailable", str(e))
        except Exception as e:
            log(traceback.format_exc())
            mb.missing(variant, "failed", _reason(e))
    return mb


def sampling_timesteps(scheduler_config, steps: int) -> list[int]:
    from engines.scheduling import make_scheduler

    sched = make_scheduler(scheduler_config, "ddim")
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def make_inputs(mb: ModelBench, batch: int):
    """The same inputs for every variant: one sample batch and the timesteps of a sampling loop, in order."""
    import torch

    C, H, W = mb.loaded.sample_shape
    x = torch.randn((batch, C, H, W), generator=torch.Generator().manual_seed(batch))
    return x, [torch.full((batch,), t, dtype=torch.int64) for t in mb.timesteps]


def make_callables(mb: ModelBench, batch: int, args) -> dict[str, Callable[[int], Any]]:
    """Per variant, a callable(i) running one UNet forward pass at batch `batch`, at the i-th timestep of the cycle."""
    import torch

    x, ts = make_inputs(mb, batch)
    n = len(ts)
    fns: dict[str, Callable[[int], Any]] = {}
    unet = mb.loaded.unet

    def torch_fp(i):
        with torch.inference_mode():
            return unet(x, ts[i % n]).sample

    fns["pytorch-fp32"] = torch_fp
    if mb.info.get("ort-fp32", {}).get("status") == "ok":
        if mb.fp_session is None:
            mb.fp_session = plain_session(mb.fp_graph, args.threads, args.ort_spinning)
        s = mb.fp_session
        feeds = [session_feeds(s, x, t) for t in ts]
        fns["ort-fp32"] = lambda i, s=s, f=feeds: s.run(None, f[i % n])
    for variant, s in mb.peer_sessions.items():
        feeds = [session_feeds(s, x, t) for t in ts]
        fns[variant] = lambda i, s=s, f=feeds: s.run(None, f[i % n])
    if mb.runner is not None:
        fns["ours"] = lambda i: mb.runner(x, ts[i % n])
        if mb.plain is not None:
            f = [session_feeds(mb.plain, x, t) for t in ts]
            fns["ours-plain-session"] = lambda i, f=f: mb.plain.run(None, f[i % n])
        if mb.runner_noprepack is not None:
            fns["ours-noprepack"] = lambda i: mb.runner_noprepack(x, ts[i % n])
    return {k: v for k, v in fns.items() if k in args.variants}


def interleaved(fns: dict[str, Callable[[int], Any]], rounds: int, iters: int, warmup: int,
                failed: dict[str, str]) -> dict[str, list[float]]:
    """Round-robin timing (ms): every round runs each variant `iters` times, the start rotating per round."""
    live = {}
    for name, fn in fns.items():
        try:
            for i in range(max(warmup, 1)):  # at least one untimed call: first-run allocations are not timed
                fn(i)
            live[name] = fn
        except Exception as e:
            log(traceback.format_exc())
            failed[name] = _reason(e)
    names = list(live)
    times: dict[str, list[float]] = {n: [] for n in names}
    perf = time.perf_counter
    for r in range(rounds):
        k = r % max(len(names), 1)
        for name in names[k:] + names[:k]:
            fn = live[name]
            for i in range(iters):
                t0 = perf()
                fn(r * iters + i)
                times[name].append((perf() - t0) * 1e3)
    return times


# ====================================================================== part: latency + dispatch


def run_latency(mbs: list[ModelBench], args) -> dict:
    rows = []
    for mb in mbs:
        for batch in args.batches:
            fns = make_callables(mb, batch, args)
            log(f"latency {mb.name} batch {batch}: {', '.join(fns)} ({args.rounds} rounds x {args.iters})")
            failed: dict[str, str] = {}
            times = interleaved(fns, args.rounds, args.iters, args.warmup, failed)
            ref = _median(times.get("ort-fp32", []))
            for variant in args.variants:
                info = mb.info.get(variant, {})
                row = {"model": mb.name, "batch": batch, "variant": variant, "label": VARIANT_LABELS[variant],
                       "diagnostic": variant in DIAGNOSTIC}
                if variant in times:
                    med = _median(times[variant])
                    row.update(status="ok", times_ms=[round(t, 3) for t in times[variant]], median_ms=round(med, 3),
                               min_ms=round(min(times[variant]), 3),
                               speedup_vs_ort_fp32=round(ref / med, 3) if ref and med else None)
                    log(f"  {variant:20s} median {med:9.2f} ms" + (f"  x{ref / med:.2f} vs ORT FP32" if ref else ""))
                elif variant in failed:
                    row.update(status="failed", reason=failed[variant])
                else:
                    row.update(status=info.get("status", "skipped"), reason=info.get("reason", "not run"))
                rows.append(row)
    return {"rows": rows, "variants": {mb.name: mb.info for mb in mbs},
            "models": {mb.name: {"params_m": mb.params_m, "sample_shape": list(mb.loaded.sample_shape),
                                 "weights": "trained (bundled)" if mb.name == "reference" else "random (seed 0)",
                                 "timesteps_cycled": mb.timesteps, "calib_trajectories_s": mb.traj_s} for mb in mbs},
            "settings": {"batches": args.batches, "rounds": args.rounds, "iters": args.iters, "warmup": args.warmup,
                         "threads": args.threads, "ort_spinning": args.ort_spinning,
                         "calib_budget": f"{args.calib_samples} samples x {args.calib_steps} DDIM steps",
                         "ours_groups": args.groups}}


def run_dispatch(mbs: list[ModelBench], args) -> dict:
    """Runner vs a bare run of the same group session, interleaved; and the runner with a null session."""
    from engines.ort_backend import OrtNoisePredictor

    rows = []
    for mb in mbs:
        if mb.runner is None:
            rows.append({"model": mb.name, "status": "failed", "reason": mb.info.get("ours", {}).get("reason")})
            continue
        runner = mb.runner
        gs = runner.group_backend.sessions  # the runner's own OrtGroupSessions (bench-only access)
        for batch in args.batches:
            x, ts = make_inputs(mb, batch)
            t = ts[0]
            k = int(runner.group_of(t)[0])
            sess = gs.sessions[k]
            feeds = session_feeds(sess, x, t)
            out_name = gs.output_name
            fns = {"runner": lambda i, r=runner, x=x, t=t: r(x, t),
                   "bare": lambda i, s=sess, o=out_name, f=feeds: s.run([o], f)}
            times = interleaved(fns, args.rounds, args.iters, args.warmup, {})
            # the runner's own cost: its group-k session swapped for one that returns the output at once
            out = sess.run([out_name], feeds)[0]
            real = gs._predictors.get(k)
            gs._predictors[k] = OrtNoisePredictor(_NullSession(sess, out))
            try:
                null_fn = {"runner-null": lambda i, r=runner, x=x, t=t: r(x, t)}
                null_t = interleaved(null_fn, 1, args.null_reps, 5, {})["runner-null"]
            finally:
                if real is None:
                    gs._predictors.pop(k, None)
                else:
                    gs._predictors[k] = real
            r, b, nm = _median(times["runner"]), _median(times["bare"]), _median(null_t)
            row = {"model": mb.name, "batch": batch, "group": k, "timestep": int(t[0]), "status": "ok",
                   "runner_ms": [round(v, 4) for v in times["runner"]], "bare_ms": [round(v, 4) for v in times["bare"]],
                   "runner_null_ms": [round(v, 5) for v in null_t],
                   "runner_median_ms": round(r, 4), "bare_median_ms": round(b, 4),
                   "difference_ms": round(r - b, 4), "difference_pct": round(100 * (r - b) / b, 3),
                   "overhead_ms": round(nm, 5), "overhead_pct": round(100 * nm / b, 4)}
            log(f"dispatch {mb.name} b{batch}: runner {r:.3f} ms, bare {b:.3f} ms, runner-only cost {nm * 1e3:.1f} us "
                f"({row['overhead_pct']:.3f}% of a step)")
            rows.append(row)
    return {"rows": rows, "null_reps": args.null_reps}


# ====================================================================== part: RSS (fresh interpreter per configuration)


RSS_CONFIGS = {
    # name -> (session_config, share the INT8 weights behind DequantizeLinear too)
    "default": ({}, False),
    "prepacking-off": (NOPREPACK, False),
    "prepacking-off+shared-int8": (NOPREPACK, True),
    "one-session": ({}, False),
}
RSS_NOTES = {
    "default": "the runner as shipped (OrtGroupSessions defaults: level extended, shared float weights and arena)",
    "prepacking-off": "session.disable_prepacking=1 (runner ort_options)",
    "prepacking-off+shared-int8": "experiment: prepacking off AND the INT8 weights behind DequantizeLinear handed to "
                                  "every session from the one memory map (engines/ort_group_sessions.py excludes "
                                  "them today; patched in the child process only)",
    "one-session": "experiment: ONE session for all groups: each group graph optimized by onnxruntime (level extended, "
                   "QDQ fused to QLinearConv) and saved, the initializers that differ between groups (activation "
                   "scales, requantized biases) made graph inputs and fed per group; weights pre-packed once. "
                   "Bypasses the runner (a bare session with per-group feeds); outputs checked against one plain "
                   "session per group (max abs difference in rss.one_session)",
}
ONE_SESSION_DIR = "one-session"


def prepare_one_session(build: Path) -> dict:
    """Experiment: the build's G group graphs as one optimized graph with the group-specific constants
    as inputs (written to build/one-session/). Returns what differs, and a bit-exactness check."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from engines.manifest import load_manifest

    m = load_manifest(build, verify="size")
    graphs = [build / g.graphs["ort"] for g in m.groups]
    out = build / ONE_SESSION_DIR
    out.mkdir(exist_ok=True)
    opt = []
    for k, g in enumerate(graphs):  # saved beside the graph, so its external weights resolve
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(build / f"one-session.g{k}.opt.onnx")
        ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"])
        opt.append(onnx.load(so.optimized_model_filepath))
    inits = [{t.name: numpy_helper.to_array(t) for t in mm.graph.initializer} for mm in opt]
    if any(set(d) != set(inits[0]) for d in inits):
        raise RuntimeError("the optimized group graphs do not have the same initializers")
    diff = sorted(n for n in inits[0] if any(not np.array_equal(inits[0][n], d[n]) for d in inits[1:]))
    shared = opt[0]
    keep = [t for t in shared.graph.initializer if t.name not in diff]
    del shared.graph.initializer[:]
    shared.graph.initializer.extend(keep)
    for n in diff:
        a = inits[0][n]
        shared.graph.input.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
    onnx.save(shared, str(out / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data")
    np.savez(out / "group_constants.npz", **{f"g{k}::{n}": inits[k][n] for k in range(len(graphs)) for n in diff})
    (out / "inputs.json").write_text(json.dumps(diff))
    for k in range(len(graphs)):
        Path(build / f"one-session.g{k}.opt.onnx").unlink()
    # bit-exactness against one plain session per group, batch 2, one timestep of each group
    import torch

    one = OneSession(build, threads=1)
    C, H, W = load_sample_shape(build)
    x = torch.randn((2, C, H, W), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for k, g in enumerate(graphs):
        t = torch.full((2,), one.table.index(k), dtype=torch.int64)
        ref = ort.InferenceSession(str(g), providers=["CPUExecutionProvider"]).run(
            None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
        worst = max(worst, float(np.abs(one(x, t) - ref).max()))
    return {"groups": len(graphs), "group_constants": len(diff), "max_abs_diff_vs_group_sessions": worst,
            "group_constant_bytes": int(sum(inits[0][n].nbytes for n in diff)), "initializers": len(inits[0])}


class OneSession:
    """The one-session experiment as a runner-like callable: group k's constants fed with the inputs."""

    def __init__(self, build: Path, threads: int):
        import numpy as np
        import onnxruntime as ort

        from engines.manifest import load_manifest

        d = build / ONE_SESSION_DIR
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already
        self.session = ort.InferenceSession(str(d / "unet.onnx"), so, providers=["CPUExecutionProvider"])
        names = json.loads((d / "inputs.json").read_text())
        z = np.load(d / "group_constants.npz")
        m = load_manifest(build, verify="size")
        self.table = m.timestep_to_group
        self.num_groups = len(m.groups)
        self.feeds = [{n: z[f"g{k}::{n}"] for n in names} for k in range(self.num_groups)]

    def __call__(self, x, t):
        k = self.table[int(t[0])]
        return self.session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), **self.feeds[k]})[0]


def rss_child(args) -> None:
    """One configuration in this fresh interpreter: load the runner, run every group, report MiB above the baseline."""
    import numpy as np  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch

    import engines.ort_group_sessions as ogs
    from engines.runner import TimestepDispatchRunner
    from measure_ort_rss import pss_mib, status_mib

    torch.set_num_threads(args.threads)
    session_config, share_int8 = RSS_CONFIGS[args.rss_config]
    if share_int8:
        ogs._dequantize_only = lambda graph: set()  # bench-only experiment, see RSS_NOTES
    r0, p0 = status_mib("VmRSS"), pss_mib()
    t0 = time.perf_counter()
    if args.rss_config == "one-session":
        runner = OneSession(Path(args.rss_child), args.threads)
        table = runner.table
        C, H, W = load_sample_shape(Path(args.rss_child))
    else:
        runner = TimestepDispatchRunner(args.rss_child, backend="ort", threads=args.threads, profile="ort",
                                        verify="size", ort_options={"session_config": dict(session_config)})
        table = runner.manifest.timestep_to_group
        C, H, W = runner.sample_shape
    load_s = time.perf_counter() - t0
    r_load = status_mib("VmRSS")
    firsts = [table.index(k) for k in range(runner.num_groups)]
    batch = args.rss_batches[0]
    x = torch.randn((batch, C, H, W), generator=torch.Generator().manual_seed(0))
    tt = [torch.full((batch,), t, dtype=torch.int64) for t in firsts]
    for t in tt:
        runner(x, t)
    r_run = status_mib("VmRSS")
    times = []
    for i in range(args.rss_reps):
        t1 = time.perf_counter()
        runner(x, tt[i % len(tt)])
        times.append((time.perf_counter() - t1) * 1e3)
    print(json.dumps({
        "config": args.rss_config, "G": runner.num_groups, "batch": batch, "rss_base_mib": round(r0, 1),
        "load_mib": round(r_load - r0, 1), "after_first_runs_mib": round(r_run - r0, 1),
        "steady_mib": round(status_mib("VmRSS") - r0, 1), "pss_steady_mib": round(pss_mib() - p0, 1),
        "peak_mib": round(status_mib("VmHWM") - r0, 1), "load_s": round(load_s, 2),
        "latency_ms": [round(v, 3) for v in times], "latency_ms_median": round(statistics.median(times), 3),
        "shared_bytes_per_session": (int(runner.group_backend.sessions.shared_bytes)
                                     if hasattr(runner, "group_backend") else None),
    }), flush=True)


def load_sample_shape(build: Path) -> tuple[int, int, int]:
    from engines.manifest import load_manifest

    m = load_manifest(build, verify="size").model
    return (m.in_channels, *m.sample_size)


def run_rss(mb: ModelBench, args) -> dict:
    """G = 1 and G = 4 builds of the same model; every (batch, config, G) in its own interpreter."""
    if args.groups not in mb.builds:
        return {"status": "failed", "reason": "no G-group build of ours", "model": mb.name}
    if 1 not in mb.builds:
        traj = calib_trajectories(mb.loaded, args.calib_samples, args.calib_steps)
        mb.builds[1], _ = build_ours(mb.loaded, traj, 1, mb.work / "build-g1")
    runs = []
    one_session = {}
    if "one-session" in args.rss_configs:
        for G in (1, args.groups):
            try:
                one_session[G] = prepare_one_session(mb.builds[G])
            except Exception as e:  # an experiment that fails is reported, the rest goes on
                one_session[G] = {"status": "failed", "reason": _reason(e)}
                log(f"one-session experiment for G={G} failed: {_reason(e)}")
    for batch in args.rss_batches:
        for config in args.rss_configs:
            for G in (1, args.groups):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(mb.builds[G]), "--rss-config",
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
            "runs": runs, "summary": summary, "one_session": one_session}


# ====================================================================== part: calibration time


TINY_ADPDM = {"search_iters": 4, "refine_iters": 2, "srm_candidates": 2, "srm_eval_steps": 2, "srm_heldout_items": 2,
              "search_items": 4}


@contextlib.contextmanager
def _adpdm_registered():
    """The adpdm method registered with the pipeline, as tools/eval_quality.py does."""
    from calibration import pipeline
    from calibration.adpdm import adpdm_method

    pipeline.register_method("adpdm", adpdm_method)
    yield


class _Progress:
    """Prints calibration progress (every ~10% of a stage) and records when each stage started and ended."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.stages: dict[str, dict[str, float]] = {}
        self._last: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter() - self.t0
        st = self.stages.setdefault(stage, {"start_s": round(now, 2), "end_s": round(now, 2), "total": total})
        st["end_s"], st["total"] = round(now, 2), total
        every = max(1, total // 10)
        if done >= total or done - self._last.get(stage, -every) >= every:
            self._last[stage] = done
            log(f"  calibration {stage}: {done}/{total} at {now:.0f} s")


def run_calibration_time(args) -> dict:
    import torch

    from calibration.pipeline import calibrate

    name = "tiny" if args.quick else "ddpm-cifar10"
    loaded = load_bench_model(name)
    samples, steps = (8, 10) if args.quick else (args.calib_time_samples, args.calib_time_steps)
    options = dict(TINY_ADPDM) if args.quick else dict(args.calib_time_options)
    torch.set_num_threads(args.threads)
    log(f"calibration time: adpdm G=4 on {name} ({params_m(loaded.unet)}M params), {samples} samples x {steps} steps")
    with tempfile.TemporaryDirectory(prefix="bench-speed-calib-") as cache, _adpdm_registered():
        t0 = time.perf_counter()
        prog = _Progress(t0)
        result = calibrate(loaded.unet, loaded.scheduler_config, method="adpdm", groups=4, calib_samples=samples,
                           calib_steps=steps, seed=0, cond=loaded.default_condition(samples), cache_dir=cache,
                           batch_size=64, progress=prog, options={**options, "log": log})
        wall = time.perf_counter() - t0
    log(f"calibration time: {wall:.1f} s")
    return {"status": "ok", "model": name, "params_m": params_m(loaded.unet), "weights": "random (seed 0)",
            "method": "adpdm", "groups": 4, "calib_samples": samples, "calib_steps": steps, "batch_size": 64,
            "adpdm_options": options or "defaults", "threads": args.threads, "wall_s": round(wall, 2),
            "timings": {k: round(float(v), 2) for k, v in result.timings.items()}, "stages": prog.stages,
            "num_groups": result.num_groups}


# ====================================================================== part: build-engine stages


def run_build(args) -> dict:
    import torch

    from adpdm_export.build_engine import CalibrationSettings, build_engine

    torch.set_num_threads(args.threads)
    settings = CalibrationSettings()  # the CLI defaults: adpdm, G = 4, 64 samples x 100 steps
    options = dict(TINY_ADPDM) if args.quick else None
    if args.quick:
        settings.calib_samples, settings.calib_steps = 4, 8
        settings.method_options = {k: str(v) for k, v in options.items()}  # build-engine's --option KEY=VALUE
    log(f"build-engine reference: {settings.method}, {settings.calib_samples} x {settings.calib_steps} (fresh folders)")
    with tempfile.TemporaryDirectory(prefix="bench-speed-build-") as tmp, _adpdm_registered():
        t0 = time.perf_counter()
        prog = _Progress(t0)
        summary = build_engine("reference", Path(tmp) / "out", settings, backend="ort", profiles=("trt", "ort"),
                               cache_dir=str(Path(tmp) / "cache"), progress=prog, say=lambda m: log(f"  {m}"))
        wall = time.perf_counter() - t0
        calib = json.loads((Path(tmp) / "out" / "calibration" / "calibration.json").read_text())
    return {"status": "ok", "model": "reference", "backend": summary.backend, "profiles": ["trt", "ort"],
            "settings": {k: v for k, v in settings.__dict__.items()}, "adpdm_options": options or "defaults",
            "threads": args.threads, "wall_s": round(wall, 2), "summary_s": round(summary.seconds, 2),
            "stages": [{"name": s.name, "seconds": round(s.seconds, 2), "reused": bool(s.reused)} for s in summary.stages],
            # model loading and hashing, stage bookkeeping, the manifest
            "outside_stages_s": round(wall - sum(s.seconds for s in summary.stages), 2),
            "calibration_timings": {k: round(float(v), 2) for k, v in (calib.get("timings") or {}).items()},
            "export_timings": summary.export_report.get("timings", {}),
            "progress_stages": prog.stages,
            "cli_equivalent": "adpdm build-engine reference --backend ort --out DIR --cache-dir FRESH"
                              + (" --calib-samples 4 --calib-steps 8 " + " ".join(f"--option {k}={v}" for k, v in options.items())
                                 if options else "")}


# ====================================================================== targets


def evaluate_targets(data: dict) -> list[dict]:
    out = []
    lat = (data.get("latency") or {}).get("rows", [])
    models = list(dict.fromkeys(r["model"] for r in lat))
    for model in models:
        rows = {(r["batch"], r["variant"]): r for r in lat if r["model"] == model and r.get("status") == "ok"}
        batches = sorted({b for b, _ in rows})
        b16 = 16 if 16 in batches else (max(batches) if batches else None)
        ours = rows.get((b16, "ours"))
        fp = rows.get((b16, "ort-fp32"))
        sp = ours["speedup_vs_ort_fp32"] if ours and fp else None
        out.append({"target": f"ours >= {TARGETS['speedup_b16']}x onnxruntime FP32 at batch {b16}", "model": model,
                    "value": sp, "unit": "x", "met": None if sp is None else sp >= TARGETS["speedup_b16"]})
        for b in batches:
            peers = [rows[(b, v)] for _, v in PEERS if (b, v) in rows]
            if ours is None or not peers:
                out.append({"target": f"ours not slower than the fastest peer graph at batch {b}", "model": model,
                            "value": None, "met": None,
                            "why": "no peer graph ran" if not peers else "ours did not run"})
                continue
            o = rows.get((b, "ours"))
            best = min(peers, key=lambda r: r["median_ms"])
            ratio = best["median_ms"] / o["median_ms"] if o else None
            out.append({"target": f"ours not slower than the fastest peer graph at batch {b}", "model": model,
                        "value": None if ratio is None else round(ratio, 3), "unit": f"x ({best['variant']} / ours)",
                        "met": None if ratio is None else ratio >= 1.0})
    for r in (data.get("dispatch") or {}).get("rows", []):
        if r.get("status") != "ok":
            continue
        out.append({"target": f"dispatch overhead < {TARGETS['dispatch_pct']}% of a step (batch {r['batch']})",
                    "model": r["model"], "value": r["overhead_pct"], "unit": "%",
                    "met": r["overhead_pct"] < TARGETS["dispatch_pct"],
                    # judged on the runner's own cost; the in-situ difference is noisier but is what a user sees
                    "why": f"in situ, runner - bare session: {r['difference_pct']:+.1f}%"})
    rss = data.get("rss") or {}
    defaults = [s for s in rss.get("summary") or [] if isinstance(s, dict) and s.get("config") == "default"]
    for d in defaults:
        out.append({"target": f"G=4 RSS <= {TARGETS['rss_ratio']}x G=1 (batch {d['batch']})", "model": rss.get("model"),
                    "value": d["ratio"], "unit": "x", "met": d["ratio"] <= TARGETS["rss_ratio"]})
    if not defaults:
        out.append({"target": f"G=4 RSS <= {TARGETS['rss_ratio']}x G=1", "model": rss.get("model"), "value": None,
                    "met": None})
    return out


# ====================================================================== markdown


def _fmt(v, spec: str = ".2f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _plot(data: dict, path: Path) -> Optional[Path]:
    rows = [r for r in (data.get("latency") or {}).get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            pts = sorted((r["batch"], r["median_ms"]) for r in rows if r["model"] == model and r["variant"] == variant)
            style = "--" if variant in DIAGNOSTIC else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=variant,
                    linewidth=2.5 if variant == "ours" else 1.2)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("median ms per UNet call")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    threads = (data.get("machine") or {}).get("threads")
    fig.suptitle(f"UNet forward latency, {threads} threads (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_markdown(data: dict, img_dir: Path, rel_img_prefix: str) -> str:
    """The "## Speed" section of docs/benchmarks.md (and the latency PNG in img_dir)."""
    L: list[str] = ["## Speed", ""]
    m = data.get("machine") or {}
    if data.get("quick"):
        L += ["**Quick run** (`--quick`: small settings, a smoke test; not the benchmark).", ""]
    lat = data.get("latency") or {}
    st = lat.get("settings") or {}
    L += [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; {m.get('threads')} threads "
        f"(torch.set_num_threads, onnxruntime intra-op {m.get('threads')} / inter-op 1"
        f"{', spinning off' if not st.get('ort_spinning') else ''}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v) + ".",
        "",
        f"Last command: `{data.get('command')}` ({data.get('date')}, {_fmt(data.get('wall_s'), '.0f')} s). "
        "Each part below comes from the command that last ran it:",
        "",
        *[f"- {part}: `{(data.get(part) or {}).get('command')}`" for part in
          ("latency", "dispatch", "rss", "calibration", "build_engine") if (data.get(part) or {}).get("command")],
        "",
        "Random weights are fine for speed: the kernels' cost does not depend on the weight values, and every "
        "quantizer's scales come from a small calibration budget "
        f"({st.get('calib_budget', 'n/a')}), which changes no kernel. All latencies of one model come from one "
        f"process, interleaved round-robin ({st.get('rounds')} rounds x {st.get('iters')} calls per variant, the "
        f"start rotating each round, {st.get('warmup')} warm-up call(s) excluded); the calls walk the "
        "timesteps of a DDIM 50-step loop in order (so ours switches groups as often as sampling does), the same "
        "inputs for every variant.",
        "",
    ]
    targets = data.get("targets") or []
    if targets:
        L += ["### Targets", "", "| target | model | measured | met |", "|---|---|---:|---|"]
        for t in targets:
            met = {True: "**yes**", False: "**no**", None: "not measured"}[t.get("met")]
            val = "n/a" if t.get("value") is None else f"{t['value']:g} {t.get('unit', '')}".strip()
            if t.get("why"):
                val += f" ({t['why']})"
            L.append(f"| {t['target']} | {t.get('model')} | {val} | {met} |")
        L.append("")
        L += [_targets_in_words(targets), ""]
    rows = lat.get("rows") or []
    if rows:
        L += ["### Latency", ""]
        models = lat.get("models") or {}
        for model in dict.fromkeys(r["model"] for r in rows):
            info = models.get(model, {})
            L += [f"**{model}** ({info.get('params_m')}M parameters, input {info.get('sample_shape')}, "
                  f"{info.get('weights')} weights)", "",
                  "| batch | variant | median ms | min ms | vs onnxruntime FP32 | runs |", "|---:|---|---:|---:|---:|---:|"]
            for r in (r for r in rows if r["model"] == model):
                if r.get("status") == "ok":
                    sp = r.get("speedup_vs_ort_fp32")
                    L.append(f"| {r['batch']} | {r['label']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                             f"{_fmt(sp, '.2f')}{'x' if sp else ''} | {len(r['times_ms'])} |")
                else:
                    L.append(f"| {r['batch']} | {r['label']} | {r.get('status')}: {r.get('reason', '')} | | | |")
            L.append("")
            var = (lat.get("variants") or {}).get(model, {})
            notes = []
            for v, i in var.items():
                bits = []
                if i.get("peer_variant"):
                    bits.append(f"peer variant {i['peer_variant']}")
                if i.get("fused"):
                    bits.append(f"onnxruntime fuses {i['fused']} quantized ops")
                if i.get("calibration_s") is not None:
                    bits.append(f"calibration {i['calibration_s']} s")
                bits += [n if len(n) <= 240 else n[:240] + "... (full text in the JSON)" for n in i.get("notes") or []]
                if bits:
                    notes.append(f"- {v}: " + "; ".join(bits))
            if notes:
                L += notes + [""]
        png = _plot(data, Path(img_dir) / PLOT_NAME)
        if png:
            L += [f"![latency by batch per variant]({rel_img_prefix}/{PLOT_NAME})", ""]
    disp = (data.get("dispatch") or {}).get("rows") or []
    if disp:
        L += ["### Runner dispatch overhead", "",
              "The runner vs a bare `session.run` of the same group session (same inputs, interleaved), and the "
              f"runner's own cost alone: its session swapped for one returning a precomputed output "
              f"(median of {(data.get('dispatch') or {}).get('null_reps')} calls).", "",
              "| model | batch | runner ms | bare session ms | difference | runner's own cost | % of a step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for r in disp:
            if r.get("status") != "ok":
                L.append(f"| {r['model']} | | {r.get('status')}: {r.get('reason')} | | | | |")
                continue
            L.append(f"| {r['model']} | {r['batch']} | {r['runner_median_ms']:.3f} | {r['bare_median_ms']:.3f} | "
                     f"{r['difference_ms']:+.3f} ms ({r['difference_pct']:+.1f}%) | {r['overhead_ms'] * 1e3:.0f} us | "
                     f"{r['overhead_pct']:.3f}% |")
        L += ["", "The target is judged on the runner's own cost. The in-situ difference of two medians is noisy (it "
              "can be negative) but is what a user sees: on a small model it can exceed the runner's own cost, "
              "because the runner's small torch operations (input checks, torch.unique / nonzero) just before "
              "onnxruntime's run slow that run down on a loaded 2-core machine.", ""]
    rss = data.get("rss") or {}
    if isinstance(rss.get("summary"), list) and (rss.get("summary") or rss.get("runs")):
        L += ["### Resident memory of the runner, G = 1 vs G = 4", "",
              f"{rss.get('model')}: real builds of ours (CPU profile, {rss.get('weights_file_mib')} MiB weights file), "
              "each configuration in a fresh interpreter; MiB of RSS above the interpreter after importing torch, "
              "numpy, onnxruntime and the runner: after loading the G sessions, and steady (after one run of every "
              f"group and {rss.get('reps')} more). Latency here is single-process and noisy; the interleaved "
              "latency table has the `ours-noprepack` row.", "",
              "| batch | configuration | after load G=1 / G=4 | steady G=1 | steady G=4 | steady ratio | per extra "
              "group (load / steady) | median ms G=1 / G=4 |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for s in rss["summary"]:
            L.append(f"| {s['batch']} | {s['config']}: {s['note']} | {s['load_G1_mib']} / {s['load_G4_mib']} | "
                     f"{s['G1_mib']} | {s['G4_mib']} | {_fmt(s['ratio'])}x | +{s['load_per_extra_group_mib']} / "
                     f"+{s['per_extra_group_mib']} | {s['latency_ms_median_G1']} / {s['latency_ms_median_G4']} |")
        for r in rss.get("runs") or []:
            if r.get("status") != "ok":
                L.append(f"| {r.get('batch')} | {r['config']} G={r['G']}: failed | | | | | | |")
        L += ["", _rss_in_words(rss), ""]
    cal = data.get("calibration") or {}
    if cal.get("status") == "ok":
        t = cal.get("timings") or {}
        L += ["### ADP-DM calibration time", "",
              f"`calibrate(method=\"adpdm\", groups=4)` on {cal['model']} ({cal['params_m']}M parameters, "
              f"{cal['weights']} weights: a trained model is not needed for timing), {cal['calib_samples']} samples x "
              f"{cal['calib_steps']} DDIM steps, batch {cal['batch_size']}, {cal['threads']} threads, ADP-DM options "
              f"{cal['adpdm_options']}" + (f" (from `{cal['command']}`)" if cal.get("command") else "") + ".", "",
              "| stage | seconds |", "|---|---:|"]
        for k, v in t.items():
            L.append(f"| {k} | {v} |")
        L += [f"| **wall** | **{cal['wall_s']}** |", ""]
    elif cal:
        L += ["### ADP-DM calibration time", "", f"{cal.get('status')}: {cal.get('reason')}", ""]
    be = data.get("build_engine") or {}
    if be.get("status") == "ok":
        L += ["### `build-engine` wall time per stage (reference model)", "",
              f"`{be['cli_equivalent']}`: fresh out folder and trajectory cache, {be['threads']} threads, "
              f"profiles {', '.join(be['profiles'])} (no TensorRT here: no engine stage).", "",
              "| stage | seconds |", "|---|---:|"]
        for s in be["stages"]:
            L.append(f"| {s['name']}{' (reused!)' if s['reused'] else ''} | {s['seconds']} |")
        for k, v in (be.get("calibration_timings") or {}).items():
            L.append(f"| calibrate / {k} | {v} |")
        for k, v in (be.get("export_timings") or {}).items():
            L.append(f"| export / {k} | {v} |")
        if be.get("outside_stages_s") is not None:
            L.append(f"| outside the stages (model load and hash, manifest) | {be['outside_stages_s']} |")
        L += [f"| **total** | **{be['wall_s']}** |", ""]
    elif be:
        L += ["### `build-engine` wall time per stage", "", f"{be.get('status')}: {be.get('reason')}", ""]
    return "\n".join(L) + "\n"


def _targets_in_words(targets: list[dict]) -> str:
    met = [t for t in targets if t.get("met") is True]
    missed = [t for t in targets if t.get("met") is False]
    unknown = [t for t in targets if t.get("met") is None]
    parts = [f"{len(met)} of {len(targets)} target rows met"]
    if missed:
        parts.append("missed: " + "; ".join(f"{t['target']} on {t.get('model')} ({t['value']:g} {t.get('unit', '')})"
                                            for t in missed))
    if unknown:
        parts.append("not measured: " + "; ".join(f"{t['target']}" + (f" ({t['why']})" if t.get("why") else "")
                                                  for t in unknown))
    return ". ".join(parts) + "."


def _rss_in_words(rss: dict) -> str:
    """What the RSS rows say: the per-group cost, and what pre-packing has to do with it."""
    words = []
    for batch in rss.get("batches") or []:
        rows = {s["config"]: s for s in rss.get("summary") or [] if s["batch"] == batch}
        d, off, shared = rows.get("default"), rows.get("prepacking-off"), rows.get("prepacking-off+shared-int8")
        if not d:
            continue
        words.append(f"Batch {batch}: as shipped, G = 4 takes {d['ratio']}x the steady memory of G = 1 "
                     f"({'meets' if d['ratio'] <= TARGETS['rss_ratio'] else 'misses'} the {TARGETS['rss_ratio']}x "
                     f"target); each extra group adds +{d['load_per_extra_group_mib']} MiB at load "
                     f"(weights file: {rss['weights_file_mib']} MiB). The one shared activation arena is in G = 1's "
                     "steady figure too, so the steady ratio falls as the batch grows.")
        if off:
            prepack = off["load_per_extra_group_mib"] < 0.5 * d["load_per_extra_group_mib"]
            words.append(f"Pre-packing off (`session.disable_prepacking`): +{off['load_per_extra_group_mib']} MiB per "
                         f"extra group at load, +{off['per_extra_group_mib']} MiB steady ({off['ratio']}x), "
                         f"{off['latency_ms_median_G4']} vs {d['latency_ms_median_G4']} ms per call: "
                         + ("so most of the per-group cost is onnxruntime's per-session pre-packed copy of the fused "
                            "INT8 weights (onnxruntime's Python API has no PrepackedWeightsContainer to share it); "
                            "without pre-packing the INT8 weights are still read once per session, and the kernels are "
                            "slower." if prepack else
                            "so the per-group cost is mostly per-session overhead other than pre-packed weights "
                            "(graph, kernels, buffers), not the weights."))
        if shared:
            words.append(f"Pre-packing off AND the INT8 weights handed to every session from the one memory map "
                         f"(a change to engines/ort_group_sessions.py, tried here in the child only): "
                         f"+{shared['per_extra_group_mib']} MiB per extra group ({shared['ratio']}x), at "
                         f"{shared['latency_ms_median_G4']} vs {d['latency_ms_median_G4']} ms per call.")
    return " ".join(words) or "The default configuration did not run."


# ====================================================================== main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings, reference model only (< 3 min on 2 cores)")
    ap.add_argument("--out-json", type=Path, default=None,
                    help=f"default: {DEFAULT_JSON.relative_to(ROOT)} ({QUICK_JSON.relative_to(ROOT)} with --quick)")
    ap.add_argument("--no-docs", action="store_true",
                    help="do not regenerate docs/benchmarks.md (the section is written beside the JSON instead); "
                         "--quick never touches docs/")
    ap.add_argument("--models", default=None, help="comma list of reference, ddpm-cifar10 (default: both; quick: reference)")
    ap.add_argument("--batches", default=None, help="default 1,16 (quick: 1,4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6; quick 3)")
    ap.add_argument("--iters", type=int, default=None, help="calls per variant per round (default 3; quick 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4, help="groups of our build")
    ap.add_argument("--calib-samples", type=int, default=4, help="calibration budget of every quantizer (speed only)")
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANT_LABELS), help="comma list of " + ", ".join(VARIANT_LABELS))
    ap.add_argument("--ort-spinning", action="store_true", help="let onnxruntime's intra-op threads spin (default off, as "
                    "the runner does: a spinning pool would compete with the next interleaved variant)")
    ap.add_argument("--null-reps", type=int, default=300, help="calls of the runner with a null session")
    ap.add_argument("--rss-model", default=None, help="model of the RSS part (default: ddpm-cifar10; quick: reference)")
    ap.add_argument("--rss-configs", default=",".join(RSS_CONFIGS), help="comma list of " + ", ".join(RSS_CONFIGS))
    ap.add_argument("--rss-batches", default=None, help="batch sizes of the RSS part (default 1,16; quick: 4); the "
                    "activation arena is shared by the groups, so the G=4 / G=1 ratio falls with the batch")
    ap.add_argument("--rss-reps", type=int, default=8)
    ap.add_argument("--calib-time", action="store_true", help="run the full ADP-DM calibration timing (long; quick mode "
                    "always runs it on a tiny UNet)")
    ap.add_argument("--calib-time-samples", type=int, default=64)
    ap.add_argument("--calib-time-steps", type=int, default=100)
    ap.add_argument("--calib-time-option", action="append", default=[],
                    help="KEY=VALUE ADP-DM option of the calibration timing (e.g. search_iters=20); default: none")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: latency, dispatch, rss, build, calib "
                    "(a skipped part keeps the previous JSON's section)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep exported graphs here (default: a temporary folder)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-config", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.calib_time_options = dict(kv.partition("=")[::2] for kv in args.calib_time_option)
    q = args.quick
    args.models = (args.models or ("reference" if q else "ddpm-cifar10,reference")).split(",")
    args.batches = [int(b) for b in (args.batches or ("1,4" if q else "1,16")).split(",")]
    args.rounds = args.rounds or (3 if q else 6)
    args.iters = args.iters or (2 if q else 3)
    if q:
        args.warmup = min(args.warmup, 1)
        args.null_reps = min(args.null_reps, 100)
        args.rss_reps = min(args.rss_reps, 4)
        if args.rss_configs == ",".join(RSS_CONFIGS):  # the shared-INT8 experiment only matters for the big model
            args.rss_configs = "default,prepacking-off"
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANT_LABELS]
    if bad:
        ap.error(f"unknown variants {bad}")
    args.rss_configs = [c for c in args.rss_configs.split(",") if c]
    bad = [c for c in args.rss_configs if c not in RSS_CONFIGS]
    if bad:
        ap.error(f"unknown RSS configurations {bad}")
    args.rss_model = args.rss_model or ("reference" if q else "ddpm-cifar10")
    args.rss_batches = [int(b) for b in (args.rss_batches or ("4" if q else "1,16")).split(",")]
    args.skip = {s for s in args.skip.split(",") if s}
    if not args.calib_time and not q:
        args.skip.add("calib")
    args.out_json = args.out_json or (QUICK_JSON if q else DEFAULT_JSON)
    return args


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; children inherit it
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return 0
    import torch

    from bench_report import machine_info, write_benchmarks_md  # tools/ is on sys.path (script dir)

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    t_start = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "tools/bench_speed.py", *(argv if argv is not None else sys.argv[1:])])
    command = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} {command}"
    previous = json.loads(args.out_json.read_text()) if args.out_json.is_file() else {}
    data: dict[str, Any] = {"schema": 1, "quick": bool(args.quick), "command": command,
                            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(args.threads),
                            "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}}
    section_of = {"latency": "latency", "dispatch": "dispatch", "rss": "rss", "calib": "calibration", "build": "build_engine"}

    def carry(part: str) -> None:
        sec = section_of[part]
        old = previous.get(sec)
        if old and previous.get("quick") == data["quick"]:
            data[sec] = {**old, "carried_over": True}

    workdir_ctx = contextlib.nullcontext(str(args.workdir)) if args.workdir else tempfile.TemporaryDirectory(prefix="bench-speed-")
    with workdir_ctx as wd:
        work = Path(wd)
        work.mkdir(parents=True, exist_ok=True)
        mbs: dict[str, ModelBench] = {}
        need = [m for m in args.models if {"latency", "dispatch"} - args.skip]  # models timed here
        if "rss" not in args.skip and args.rss_model not in need:
            need.append(args.rss_model)
        for name in need:
            log(f"setting up {name}")
            mbs[name] = setup_model(name, args, work, timed=name in args.models and bool({"latency", "dispatch"} - args.skip))
        lat_models = [mbs[m] for m in args.models if m in mbs]
        for part, fn in (("latency", lambda: run_latency(lat_models, args)),
                         ("dispatch", lambda: run_dispatch(lat_models, args)),
                         ("rss", lambda: run_rss(mbs[args.rss_model], args)),
                         ("calib", lambda: run_calibration_time(args)),
                         ("build", lambda: run_build(args))):
            if part in args.skip:
                carry(part)
                continue
            t0 = time.perf_counter()
            try:
                sec = fn()
            except Exception as e:
                log(traceback.format_exc())
                sec = {"status": "failed", "reason": _reason(e)}
            sec["part_s"] = round(time.perf_counter() - t0, 1)
            sec["command"] = command
            data[section_of[part]] = sec
            log(f"part {part}: {sec['part_s']} s")
        for mb in mbs.values():
            for r in (mb.runner, mb.runner_noprepack):
                if r is not None:
                    r.close()
    data["targets"] = evaluate_targets(data)
    data["wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(data, indent=1))
    log(f"wrote {args.out_json} ({data['wall_s']} s)")
    if args.quick or args.no_docs:
        md = args.out_json.with_suffix(".md")
        md.write_text(render_markdown(data, md.parent, "."))
        log(f"wrote {md}")
    else:
        log(f"wrote {write_benchmarks_md(speed_json=args.out_json)}")
    for t in data["targets"]:
        log(f"target {t['target']} [{t.get('model')}]: {t.get('value')} -> {t.get('met')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
