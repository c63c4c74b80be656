"""The command line: options, the parts in order, the JSON (a skipped part carried over from the
previous JSON) and the Speed section (docs/benchmarks.md, or beside the JSON)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import __doc__ as PACKAGE_DOC
from .build_stages import run_build
from .calib_time import run_calibration_time
from .common import ROOT, log, reason
from .dispatch import run_dispatch
from .latency import run_latency
from .models import VARIANT_LABELS, ModelBench, setup_model
from .parity import run_parity
from .report import render_markdown
from .rss import RSS_CONFIGS, rss_child, run_rss
from .targets import evaluate_targets

DEFAULT_JSON = ROOT / "docs" / "bench_speed.json"
QUICK_JSON = ROOT / "runs" / "bench-speed-quick.json"
INVOCATION = (".venv/bin/python", "-m", "tools.bench_speed")  # from the repository root; recorded in the JSON


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench_speed", description=PACKAGE_DOC.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--skip", default="", help="comma list of parts to skip: latency, dispatch, parity, rss, build, calib "
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
            args.rss_configs = "default,per-group"
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

    from tools.bench_report import machine_info, write_benchmarks_md

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    t_start = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [*INVOCATION, *(argv if argv is not None else sys.argv[1:])])
    command = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} {command}"
    previous = json.loads(args.out_json.read_text()) if args.out_json.is_file() else {}
    data: dict[str, Any] = {"schema": 1, "quick": bool(args.quick), "command": command,
                            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(args.threads),
                            "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}}
    section_of = {"latency": "latency", "dispatch": "dispatch", "rss": "rss", "calib": "calibration", "build": "build_engine",
                  "parity": "one_session_parity"}

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
                         ("parity", lambda: run_parity(list(mbs.values()), args)),
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
                sec = {"status": "failed", "reason": reason(e)}
            sec["part_s"] = round(time.perf_counter() - t0, 1)
            sec["command"] = command
            data[section_of[part]] = sec
            log(f"part {part}: {sec['part_s']} s")
        for mb in mbs.values():
            for r in (mb.runner, mb.runner_noprepack, mb.runner_per_group):
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
