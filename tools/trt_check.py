#!/usr/bin/env python
"""TensorRT check of a build, start to finish, on a machine with TensorRT and a GPU.

    python tools/trt_check.py --model reference --out runs/trt-check --fast --json runs/trt-check/report.json

1. Build (or resume) the model's TensorRT build with the project's own orchestration
   (`adpdm_export.build_pipeline.build_engine(..., backend="trt")`: calibrate -> QDQ export ->
   one strongly typed INT8 engine per timestep group, manifest written last), optimization
   profile batch 1..16.
2. An FP16 TensorRT engine of the same UNet, from its FP ONNX graph
   (`adpdm_export.sampling.fp_graph_for`), same optimization profile and builder
   optimization level: the baseline the INT8 groups are timed against. Strongly typed
   networks take every precision from the graph, so the FP16 baseline is built the way
   `trtexec --fp16` builds it: a *weakly typed* network with `BuilderFlag.FP16` (TensorRT
   picks FP16 or FP32 per layer, fastest first). TensorRT deprecated weak typing in 10.12
   and removed it in 11; there the standard route is converting the graph with ModelOpt
   AutoCast and building strongly typed, which this script does not do (it says so).
3. Accuracy, with polygraphy's comparator: for every group, `Comparator.run` over a
   `TrtRunner` on the group's INT8 engine, an `OnnxrtRunner` on the same group's QDQ graph
   (onnxruntime CPU, graph optimizations off: the graph's exact Q/DQ semantics) and an
   `OnnxrtRunner` on the FP32 graph, fed with inputs whose timesteps are spread over the
   group's own timestep ranges (group boundaries included); `Comparator.compare_accuracy`
   with a simple compare function (atol/rtol on an error statistic) decides pass/fail of
   engine vs onnxruntime. The FP16 engine is compared the same way against the FP32 graph.
   Beside polygraphy's verdict the table gives max |diff| and relative L2 error against
   the QDQ graph and against FP32 (the latter is the quantization error, for scale).
4. Latency: the project's runtime (`engines.trt_backend.TrtGroupEngines.run`, as the
   timestep-dispatching runner calls it), CUDA events around each call, synchronized per
   call, median over --iters calls after --warmup calls, batch 1 and 16, every INT8 group
   and the FP16 engine.

Prints one table and writes a JSON report (--json). Exit status: 0 every comparison
passed, 1 a comparison failed, 2 TensorRT, a CUDA GPU or polygraphy is missing (one
line). `--fast` (uniform groups, few calibration samples/steps, fewer iterations) keeps
the whole run under 8 minutes on one GPU; the engine checks do not depend on how the
scales were chosen (all methods give the same graphs up to scale values).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.errors import AdpdmError  # noqa: E402

FP16_DIR = "fp16"
FP16_ENGINE = "unet.fp16.plan"
TIME_BUDGET_S = 480.0  # the --fast promise: start to finish under 8 minutes on one GPU


# --------------------------------------------------------------------------- prerequisites


def require_everything():
    """(tensorrt, polygraphy) modules, or AdpdmError with one line saying what is missing."""
    from engines.platform import require_tensorrt

    trt = require_tensorrt()  # TensorRT >= 10 and a CUDA GPU, else one AdpdmError line
    try:
        import polygraphy
    except ImportError:
        raise AdpdmError(
            "tools/trt_check.py needs polygraphy: pip install 'adpdm-export[gpu]' (or pip install polygraphy)"
        ) from None
    return trt, polygraphy


def simple_compare_func(atol: float, rtol: float, stat: str):
    """polygraphy's simple comparison: `SimpleCompareFunc` (>= 0.53), `CompareFunc.simple` before."""
    from polygraphy import comparator

    if hasattr(comparator, "SimpleCompareFunc"):
        return comparator.SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=stat)
    return comparator.CompareFunc.simple(atol=atol, rtol=rtol, check_error_stat=stat)


# --------------------------------------------------------------------------- FP16 baseline


def build_fp16_engine(trt, graph: Path, path: Path, manifest, opt_level: int) -> float:
    """The FP16 baseline engine of the FP graph (weakly typed + BuilderFlag.FP16), same optimization profile as the build."""
    from engines.file_io import atomic_write_bytes
    from engines.trt_builder import optimization_profile_shapes

    if not hasattr(trt.BuilderFlag, "FP16"):
        raise AdpdmError(
            f"TensorRT {trt.__version__} has no FP16 builder flag (weak typing was removed): convert the FP graph "
            "to FP16 with ModelOpt AutoCast and build it strongly typed for the FP16 baseline"
        )
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # weakly typed: the FP16 flag lets TensorRT lower precision
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown error"
        raise AdpdmError(f"TensorRT could not parse {graph}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    config.set_flag(trt.BuilderFlag.FP16)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    opt_profile = builder.create_optimization_profile()
    shapes = optimization_profile_shapes(names, manifest.model.in_channels, manifest.tensorrt.optimization_profile, manifest.model.conditioning)
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AdpdmError(f"TensorRT could not build the FP16 engine from {graph} (see the TensorRT log above)")
    atomic_write_bytes(path, bytes(memoryview(serialized)))
    return time.perf_counter() - t0


def fp16_manifest(manifest, engine_rel: str):
    """A one-group view of the build whose engine is the FP16 baseline (for TrtGroupEngines)."""
    return replace(manifest, groups=[replace(manifest.groups[0], engine=engine_rel)])


# --------------------------------------------------------------------------- inputs


def group_timesteps(ranges, n: int) -> list[int]:
    """n timestep values spread evenly over a group's inclusive ranges, first and last included."""
    values = [t for lo, hi in ranges for t in range(int(lo), int(hi) + 1)]
    if not values:
        return []
    if n <= 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def make_feeds(manifest, timesteps: list[int], batch: int, seed: int) -> list[dict[str, Any]]:
    """polygraphy feed dicts (numpy) of `batch` items each, over `timesteps` in order."""
    from collections import OrderedDict

    import numpy as np

    rng = np.random.default_rng(seed)
    c = manifest.model.in_channels
    h, w = manifest.model.sample_size
    cond = manifest.model.conditioning
    seq = manifest.tensorrt.optimization_profile.sequence_length if manifest.tensorrt else None
    feeds = []
    for i in range(0, len(timesteps), batch):
        ts = timesteps[i:i + batch]
        b = len(ts)
        feed = OrderedDict()
        feed["sample"] = rng.standard_normal((b, c, h, w)).astype(np.float32)
        feed["timestep"] = np.asarray(ts, dtype=np.int64)
        if "encoder_hidden_states" in cond:
            dim = int(cond["encoder_hidden_states"]["dim"])
            feed["encoder_hidden_states"] = rng.standard_normal((b, int(seq or 77), dim)).astype(np.float32)
        if "class_labels" in cond:
            n = int(cond["class_labels"]["num_classes"])
            feed["class_labels"] = rng.integers(0, n, size=(b,), dtype=np.int64)
        feeds.append(feed)
    return feeds


def torch_feeds(manifest, batch: int, timestep: int, device) -> dict[str, Any]:
    """One batch of CUDA tensors for timing (values do not matter to the engines' speed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    c = manifest.model.in_channels
    h, w = manifest.model.sample_size
    feeds = {
        "sample": torch.randn((batch, c, h, w), generator=g),
        "timestep": torch.full((batch,), int(timestep), dtype=torch.int64),
    }
    cond = manifest.model.conditioning
    if "encoder_hidden_states" in cond:
        seq = int(manifest.tensorrt.optimization_profile.sequence_length or 77)
        feeds["encoder_hidden_states"] = torch.randn((batch, seq, int(cond["encoder_hidden_states"]["dim"])), generator=g)
    if "class_labels" in cond:
        feeds["class_labels"] = torch.arange(batch, dtype=torch.int64) % int(cond["class_labels"]["num_classes"])
    return {k: v.to(device) for k, v in feeds.items()}


# --------------------------------------------------------------------------- accuracy


def _errors(a, b) -> dict[str, float]:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = a - b
    return {
        "max_abs": float(np.max(np.abs(d))),
        "mean_abs": float(np.mean(np.abs(d))),
        "rel_l2": float(np.linalg.norm(d) / max(np.linalg.norm(b), 1e-12)),
    }


def _pooled(results, name: str, output: str):
    import numpy as np

    return np.concatenate([np.asarray(it[output]) for it in results[name]], axis=0)


def compare(runners, feeds, compare_func, reference_pairs: dict[str, tuple[int, int]], output: str):
    """Comparator.run + compare_accuracy (pair 0-1 decides pass/fail); pooled errors per named pair."""
    from polygraphy.comparator import Comparator

    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, comparisons=[(0, 1)], compare_func=compare_func)
    names = [r.name for r in runners]
    errors = {
        label: _errors(_pooled(results, names[i], output), _pooled(results, names[j], output))
        for label, (i, j) in reference_pairs.items()
    }
    return bool(accuracy), errors


# --------------------------------------------------------------------------- timing


def time_engine(engines, k: int, feeds, warmup: int, iters: int) -> float:
    """Median milliseconds of `engines.run(k, feeds)`, CUDA events, synchronized per call."""
    import torch

    for _ in range(max(warmup, 1)):
        engines.run(k, feeds)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engines.run(k, feeds)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# --------------------------------------------------------------------------- report


def ranges_text(ranges) -> str:
    return ", ".join(f"{lo}-{hi}" for lo, hi in ranges) or "-"


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    bs = report["settings"]["batch_sizes"]
    table = Table(title=(f"TensorRT check: {report['model']}, {report['platform']['gpu']}, "
                         f"TensorRT {report['platform']['tensorrt']} (median of {report['settings']['iters']} calls)"))
    for col in ("engine", "timesteps", "vs onnxruntime", "max |d|", "rel L2", "rel L2 vs FP32"):
        table.add_column(col, justify="left" if col in ("engine", "timesteps") else "right")
    for b in bs:
        table.add_column(f"ms b{b}", justify="right")
        table.add_column(f"x FP16 b{b}", justify="right")
    fp16 = report["fp16"]
    for row in [*report["groups"], fp16]:
        acc = row["accuracy"]
        ref = acc["errors"].get("vs_onnxruntime", {})
        fp = acc["errors"].get("vs_fp32", {})
        cells = [
            row["engine_label"], ranges_text(row["timestep_ranges"]),
            "[green]pass[/]" if acc["passed"] else "[red]FAIL[/]",
            f"{ref.get('max_abs', float('nan')):.2e}", f"{ref.get('rel_l2', float('nan')):.2e}",
            f"{fp.get('rel_l2', float('nan')):.2e}",
        ]
        for b in bs:
            ms = row["latency_ms"].get(str(b))
            base = fp16["latency_ms"].get(str(b))
            cells += [f"{ms:.3f}" if ms is not None else "-",
                      f"{base / ms:.2f}" if ms and base else "-"]
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not wrap the table at 80 columns
        console = Console(width=160)
    console.print(table)
    console.print(
        f"polygraphy {report['settings']['compare']['stat']} error, atol {report['settings']['compare']['atol']}, "
        f"rtol {report['settings']['compare']['rtol']}; INT8 groups vs the same QDQ graph in onnxruntime (CPU), "
        f"FP16 vs the FP32 graph. x FP16 = FP16 latency / this engine's. Total {report['seconds']['total']:.0f} s."
    )


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference", help="model: 'reference' or a diffusers UNet/pipeline folder")
    p.add_argument("--out", default="runs/trt-check", help="build folder (resumed when its settings match)")
    p.add_argument("--fast", action="store_true",
                   help="uniform groups, few calibration samples/steps, fewer iterations: whole run < 8 min on one GPU")
    p.add_argument("--iters", type=int, default=None, help="timed calls per (engine, batch) (default 100; --fast 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--json", default=None, help="write the report here (default OUT/trt_check.json)")
    p.add_argument("--method", default=None, help="calibration method (default adpdm; --fast uniform-groups)")
    p.add_argument("--groups", type=int, default=4, help="timestep groups")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples (default 64; --fast 8)")
    p.add_argument("--calib-steps", type=int, default=None, help="calibration sampler steps (default 100; --fast 20)")
    p.add_argument("--calib-device", default="cpu", help="device for calibration (cpu | cuda)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="timed batch sizes (optimization profile min..max)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0..5)")
    p.add_argument("--compare-batch", type=int, default=4, help="batch size of each comparison input")
    p.add_argument("--compare-batches", type=int, default=None, help="comparison inputs per engine (default 4; --fast 2)")
    p.add_argument("--atol", type=float, default=2e-2, help="polygraphy absolute tolerance")
    p.add_argument("--rtol", type=float, default=2e-2, help="polygraphy relative tolerance")
    p.add_argument("--error-stat", default="mean", choices=("elemwise", "max", "mean", "median"),
                   help="polygraphy error statistic checked against the tolerances")
    p.add_argument("--shared-scales", action="store_true",
                   help="also build ONE engine for all groups (unit-scale Q/DQ, per-group scales as a runtime input; "
                        "engines/trt_shared_scales.py) and check it per group against the same graph in onnxruntime "
                        "and the group engines' outputs; reports plan bytes (one copy of the weights vs G)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild every stage")
    p.add_argument("--verbose", action="store_true", help="polygraphy's own log lines too")
    args = p.parse_args(argv)
    fast = args.fast
    args.method = args.method or ("uniform-groups" if fast else "adpdm")
    args.calib_samples = args.calib_samples or (8 if fast else 64)
    args.calib_steps = args.calib_steps or (20 if fast else 100)
    args.iters = args.iters or (30 if fast else 100)
    args.compare_batches = args.compare_batches or (2 if fast else 4)
    return args


def run(args: argparse.Namespace, trt, polygraphy, t_start: float) -> int:
    import onnxruntime
    import torch
    from rich.console import Console

    from adpdm_export.build_pipeline import CalibrationPlan, build_engine
    from calibration.configs import DataFreeConfig, method_config
    from calibration.qconfig import QuantConfig
    from adpdm_export.model_loading import load_model
    from adpdm_export.sampling import fp_graph_for
    from engines.file_io import sha256_file
    from engines.manifest import load_manifest
    from engines.ort_backend import OUTPUT_NAME, make_session
    from engines.platform import gpu_identity
    from engines.trt_backend import TrtGroupEngines
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    console = Console(stderr=True)
    say = lambda msg: console.print(f"[dim]{msg}[/]", highlight=False)  # noqa: E731
    if not args.verbose:
        from polygraphy.logger import G_LOGGER

        if hasattr(G_LOGGER, "module_severity"):
            G_LOGGER.module_severity = G_LOGGER.WARNING
        else:  # older polygraphy
            G_LOGGER.severity = G_LOGGER.WARNING

    out = Path(args.out)
    batch_sizes = sorted({int(b) for b in args.batch_sizes})
    seconds: dict[str, float] = {}

    # 1. the build: calibrate -> export -> INT8 engines (resumed when nothing changed)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    plan = CalibrationPlan(method_config(args.method, {"groups": args.groups}), QuantConfig(),
                           DataFreeConfig(samples=args.calib_samples, steps=args.calib_steps), args.seed,
                           args.calib_device)
    summary = build_engine(
        loaded, out, plan.method, plan.quant, plan.data, seed=plan.seed, device=plan.device, backend="trt",
        targets=("trt",), batch_sizes=batch_sizes, opt_level=args.opt_level, force=args.force, say=say,
    )
    manifest = load_manifest(out)
    seconds["build"] = time.perf_counter() - t0
    say(f"build: {manifest.num_groups} INT8 group engines in {out} ({seconds['build']:.1f} s)")

    # 2. FP16 baseline engine of the FP graph, same optimization profile
    t0 = time.perf_counter()
    fp_graph = fp_graph_for(loaded)
    fp16_rel = f"{FP16_DIR}/{FP16_ENGINE}"
    fp16_path = out / fp16_rel
    key_path = fp16_path.with_suffix(".key.json")
    key = {"graph": sha256_file(fp_graph), "weights": sha256_file(fp_graph.with_name(fp_graph.name + ".data")),
           "tensorrt": str(trt.__version__), "gpu": list(gpu_identity()), "opt_level": args.opt_level,
           "profile": asdict(manifest.tensorrt.optimization_profile)}  # key name kept: engines built before reuse
    key = json.loads(json.dumps(key))  # tuples -> lists, as read back
    reused = (not args.force and fp16_path.is_file() and key_path.is_file()
              and json.loads(key_path.read_text()) == key)
    if not reused:
        key_path.unlink(missing_ok=True)
        build_fp16_engine(trt, fp_graph, fp16_path, manifest, args.opt_level)
        key_path.write_text(json.dumps(key, indent=2) + "\n")
    seconds["fp16_build"] = time.perf_counter() - t0
    say(f"fp16: baseline engine {fp16_path} {'reused' if reused else 'built'} ({seconds['fp16_build']:.1f} s)")

    # 3. accuracy with polygraphy, per group at the group's timesteps
    t0 = time.perf_counter()
    func = simple_compare_func(args.atol, args.rtol, args.error_stat)
    fp_session = make_session(fp_graph, providers=["CPUExecutionProvider"], optimize=False)
    lo_b, _, hi_b = manifest.tensorrt.optimization_profile.batch
    compare_batch = min(max(args.compare_batch, lo_b), hi_b)  # inside the engines' optimization profile
    n_items = compare_batch * args.compare_batches
    groups: list[dict[str, Any]] = []
    for g, engine_path, qdq_graph in zip(manifest.groups, manifest.engine_paths(), manifest.graph_paths("trt")):
        ts = group_timesteps(g.timestep_ranges, n_items)
        if not ts:
            raise AdpdmError(f"group {g.id} of the build has no timesteps: the build is inconsistent, rebuild it")
        feeds = make_feeds(manifest, ts, compare_batch, seed=args.seed + g.id)
        runners = [
            TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=f"trt-int8-g{g.id}"),
            OnnxrtRunner(make_session(qdq_graph, providers=["CPUExecutionProvider"], optimize=False),
                         name=f"onnxrt-qdq-g{g.id}"),
            OnnxrtRunner(fp_session, name="onnxrt-fp32"),
        ]
        passed, errors = compare(runners, feeds, func, {"vs_onnxruntime": (0, 1), "vs_fp32": (0, 2)}, OUTPUT_NAME)
        groups.append({
            "group": g.id, "engine": g.engine, "engine_label": f"INT8 g{g.id}",
            "timestep_ranges": [list(r) for r in g.timestep_ranges], "compared_timesteps": ts,
            "accuracy": {"passed": passed, "errors": errors}, "latency_ms": {},
        })
        say(f"compare: group {g.id} {'pass' if passed else 'FAIL'} (rel L2 vs onnxruntime "
            f"{errors['vs_onnxruntime']['rel_l2']:.2e})")
    T = manifest.num_train_timesteps
    ts_all = group_timesteps([(0, T - 1)], n_items)
    feeds = make_feeds(manifest, ts_all, compare_batch, seed=args.seed + 1000)
    runners = [
        TrtRunner(EngineFromBytes(BytesFromPath(str(fp16_path))), name="trt-fp16"),
        OnnxrtRunner(fp_session, name="onnxrt-fp32"),
    ]
    passed, errors = compare(runners, feeds, func, {"vs_onnxruntime": (0, 1), "vs_fp32": (0, 1)}, OUTPUT_NAME)
    fp16 = {
        "engine": fp16_rel, "engine_label": "FP16", "timestep_ranges": [[0, T - 1]],
        "compared_timesteps": ts_all, "accuracy": {"passed": passed, "errors": errors}, "latency_ms": {},
    }
    seconds["compare"] = time.perf_counter() - t0

    # 3b. (--shared-scales) one engine for all groups, group scales fed per call (issue 16)
    shared = check_shared_scale_engine(args, manifest, out, func, compare_batch, n_items, groups, say) \
        if args.shared_scales else None
    if shared is not None:
        seconds["shared_scales"] = shared.pop("seconds")

    # 4. latency through the project's TensorRT runtime, CUDA events
    t0 = time.perf_counter()
    int8 = TrtGroupEngines(manifest)
    half = TrtGroupEngines(fp16_manifest(manifest, fp16_rel))
    try:
        for b in batch_sizes:
            for row in groups:
                mid = row["compared_timesteps"][len(row["compared_timesteps"]) // 2]
                x = torch_feeds(manifest, b, mid, int8.device)
                row["latency_ms"][str(b)] = time_engine(int8, row["group"], x, args.warmup, args.iters)
            x = torch_feeds(manifest, b, T // 2, half.device)
            fp16["latency_ms"][str(b)] = time_engine(half, 0, x, args.warmup, args.iters)
    finally:
        int8.close()
        half.close()
    seconds["timing"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    gpu, cc = gpu_identity()
    report = {
        "model": args.model,
        "build": str(out),
        "platform": {
            "gpu": gpu, "compute_capability": cc, "tensorrt": str(trt.__version__),
            "polygraphy": str(polygraphy.__version__), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        },
        "settings": {
            "fast": bool(args.fast), "calibration": plan.key(), "batch_sizes": batch_sizes,
            "opt_level": args.opt_level, "iters": args.iters, "warmup": args.warmup,
            "compare": {"atol": args.atol, "rtol": args.rtol, "stat": args.error_stat,
                        "batch": compare_batch, "batches": args.compare_batches,
                        "onnxruntime": "CPUExecutionProvider, graph optimizations off"},
            "fp16_baseline": "FP graph, weakly typed network + BuilderFlag.FP16, same optimization profile and opt level",
            "timing": "TrtGroupEngines.run, CUDA events, synchronized per call, median",
        },
        "stages": [{"name": s.name, "reused": bool(s.reused), "seconds": s.seconds} for s in summary.stages],
        "groups": groups,
        "fp16": fp16,
        "shared_scales": shared,
        "passed": all(r["accuracy"]["passed"] for r in [*groups, fp16, *((shared or {}).get("groups") or [])]),
        "seconds": seconds,
    }
    json_path = Path(args.json) if args.json else out / "trt_check.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    say(f"report: {json_path}")
    if args.fast and seconds["total"] > TIME_BUDGET_S:
        console.print(f"[yellow]warning: --fast took {seconds['total']:.0f} s, over the {TIME_BUDGET_S:.0f} s budget[/]")
    return 0 if report["passed"] else 1


def check_shared_scale_engine(args, manifest, out: Path, func, compare_batch: int, n_items: int, groups, say) -> dict:
    """Build `unet.shared.plan` (engines.trt_builder.build_shared_scale_engine) and compare it, group by group at the
    group's timesteps, with the shared graph in onnxruntime (CPU, optimizations off; same inputs, so the engine's own
    arithmetic). The shared graph against the group graphs is checked on CPU (tests/test_trt_shared_scales.py)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from engines.ort_backend import OUTPUT_NAME, make_session
    from engines.trt_builder import build_shared_scale_engine
    from engines.trt_shared_scales import GROUP_SCALES_INPUT, SHARED_ENGINE_NAME, load_group_scales

    t0 = time.perf_counter()
    info = manifest.tensorrt
    res = build_shared_scale_engine(manifest.graph_paths("trt"), out, info.optimization_profile,
                                    manifest.model.in_channels, manifest.model.conditioning, args.opt_level)
    engine_path = res.engines[0]
    graph = out / "unet.shared.trt.onnx"
    _, table = load_group_scales(out / "unet.shared.trt.scales.npz")
    rows = []
    for g in manifest.groups:
        ts = group_timesteps(g.timestep_ranges, n_items)
        feeds = make_feeds(manifest, ts, compare_batch, seed=args.seed + g.id)
        with_scales = [{**f, GROUP_SCALES_INPUT: table[g.id]} for f in feeds]
        runners = [TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=f"trt-shared-g{g.id}"),
                   OnnxrtRunner(make_session(graph, providers=["CPUExecutionProvider"], optimize=False),
                                name=f"onnxrt-shared-g{g.id}")]
        passed, errors = compare(runners, with_scales, func, {"vs_onnxruntime": (0, 1)}, OUTPUT_NAME)
        rows.append({"group": g.id, "accuracy": {"passed": passed, "errors": errors}})
        say(f"shared-scale engine: group {g.id} {'pass' if passed else 'FAIL'}")
    group_bytes = sum(p.stat().st_size for p in manifest.engine_paths())
    return {"engine": SHARED_ENGINE_NAME, "plan_bytes": engine_path.stat().st_size, "group_plans_bytes": group_bytes,
            "groups": rows, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        trt, polygraphy = require_everything()
    except AdpdmError as e:  # no TensorRT, no GPU or no polygraphy: one line, exit 2, nothing built
        print(f"trt_check: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, trt, polygraphy, t_start)
    except AdpdmError as e:
        print(f"trt_check: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
