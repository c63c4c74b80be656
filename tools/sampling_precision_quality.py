"""What sampling the calibration trajectories in bf16 / fp16 costs in quality, and what it saves in time.

    .venv/bin/python tools/sampling_precision_quality.py --bits W8A6 --json docs/sampling_precision.json

For each precision (`DataFreeConfig.precision`: fp32, bf16, fp16), ADP-DM is calibrated data-free
at its defaults (or `--adpdm-option KEY=VALUE`) on the bundled reference model (trajectories sampled each time, no cache), on the
CPU this runs on (torch.autocast on the CPU: bf16 uses the CPU's bf16 instructions where it has
them; fp16 is mostly emulated there, so its time says nothing about a GPU). Each result is judged
on held-out seeds (never used in calibration; DDIM 50, sampled in FP32) per sample: noise relative
L2 vs FP (median, p90), PSNR vs the FP sample (median, p10), Frechet distance in the digits
classifier's features; plus the probe's error (calibration.sampling_precision), the time of the
trajectory stage and of the whole calibration, and how far each activation scale moved from the
FP32 calibration's (median and max relative change). `--control-seed N` adds an FP32 calibration
from other seeds: the spread a calibration has anyway, to read the half-precision rows against.
docs/method.md holds the table this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools.quality_harness import (  # noqa: E402
    add_setup_arguments,
    evaluate_model,
    fmt,
    log,
    quant_config,
    reference_sweep,
)

PRECISIONS = ("fp32", "bf16", "fp16")


def scale_shift(result, base) -> dict[str, float]:
    """Relative change of every activation scale (all groups) against the FP32 calibration's."""
    a, b = result.input_scales, base.input_scales
    rel = torch.cat([((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-12)).flatten() for k in sorted(b)])
    return {"scale_rel_change_median": float(rel.median()), "scale_rel_change_max": float(rel.max())}


def run(args) -> dict:
    from calibration import pipeline
    from calibration.configs import DataFreeConfig, method_config
    from calibration.quant_unet import quantize_model

    store, out, setup, (w, a) = reference_sweep(args)
    loaded = setup.loaded
    results = {}
    # (record key, precision, calibration seed): the control is FP32 from other seeds, the spread a
    # calibration has anyway, to read the half-precision rows against
    runs = [(p, p, args.seed) for p in args.precisions.split(",")]
    if args.control_seed is not None:
        runs.append((f"fp32-seed{args.control_seed}", "fp32", args.control_seed))
    for name, precision, calib_seed in runs:
        key = f"{args.bits}/{name}"
        if key in out["runs"] and not args.force and precision != "fp32":
            log(f"skip {key} (recorded)")
            continue
        data = DataFreeConfig(samples=args.calib_samples, steps=args.calib_steps, precision=precision)
        lines: list[str] = []
        t0 = time.perf_counter()
        method = method_config("adpdm", dict(kv.split("=", 1) for kv in args.adpdm_option))
        result = pipeline.calibrate(loaded.unet, loaded.scheduler_config, method, quant_config(w, a, False),
                                    data=data, seed=calib_seed, cond=loaded.default_condition(data.samples),
                                    batch_size=args.batch_size, log=lines.append)
        calib_s = time.perf_counter() - t0
        results[name] = result
        if key in out["runs"] and not args.force:  # the FP32 reference, calibrated again for the scale shifts
            log(f"skip {key} (recorded)")
            continue
        qmodel = quantize_model(loaded.unet, result=result)
        metrics, _ = evaluate_model(qmodel, loaded.scheduler_config, setup.heldout, setup.feature_fn,
                                    setup.real_stats, args.batch_size)
        shift = scale_shift(result, results["fp32"]) if name != "fp32" and "fp32" in results else {}
        out["runs"][key] = {
            "precision": precision, "calibration_seed": calib_seed, "sampling_precision": result.config["calibration"]["sampling_precision"],
            "check": result.config["calibration"].get("sampling_precision_check"), "data": data.to_dict(),
            "trajectories_s": result.timings["trajectories_s"], "calibration_s": calib_s,
            "cpu": cpu_name(), "threads": args.threads, **shift, **metrics,
        }
        log(f"{key}: trajectories {result.timings['trajectories_s']:.1f} s, calibration {calib_s:.1f} s; rel-L2 median "
            f"{metrics['noise_rel_l2_median']:.4f} PSNR median {metrics['psnr_per_sample_median_db']:.2f} dB "
            f"FD {fmt(metrics['fd'], '.1f')}")
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(out, indent=1))
    if args.time_reps:
        out["sampling_time"] = {"cpu": cpu_name(), "threads": args.threads, **time_sampling(
            loaded, args.precisions.split(","), args.calib_samples, args.calib_steps, args.time_reps, args.batch_size)}
        log(f"sampling time vs fp32: {out['sampling_time']['vs_fp32']}")
        store.write_text(json.dumps(out, indent=1))
    return out


def time_sampling(loaded, precisions: list[str], samples: int, steps: int, reps: int, batch_size: int) -> dict:
    """Seconds of the trajectory sampling alone per precision: reps interleaved, medians (no cache)."""
    from calibration.trajectories import generate_trajectories

    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(reps):
        for precision in precisions:
            t0 = time.perf_counter()
            generate_trajectories(loaded.unet, loaded.scheduler_config, num_samples=samples, num_steps=steps,
                                  cond=loaded.default_condition(samples), batch_size=batch_size, precision=precision)
            seconds[precision].append(time.perf_counter() - t0)
    med = {p: sorted(v)[len(v) // 2] for p, v in seconds.items()}
    return {"samples": samples, "steps": steps, "reps": reps, "median_s": med, "all_s": seconds,
            "vs_fp32": {p: med[p] / med["fp32"] for p in precisions} if "fp32" in med else {}}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def seed_note(r: dict) -> str:
    seed = r.get("calibration_seed", 0)
    return f" (calibration seed {seed})" if seed else ""


def table(out: dict, bits: str) -> str:
    rows = ["| sampled in | probe error (worst item) | trajectories | calibration | activation scales moved: median / max "
            "| rel-L2 median / p90 | PSNR median / p10 (dB) | FD |",
            "|---|---|---|---|---|---|---|---|"]
    for key, r in out["runs"].items():
        if not key.startswith(bits + "/"):
            continue
        check = r.get("check") or {}
        err = check.get("probe_rel_l2_max")
        moved = (f"{r['scale_rel_change_median']:.2%} / {r['scale_rel_change_max']:.2%}"
                 if "scale_rel_change_median" in r else "(reference)")
        rows.append(
            f"| {r['sampling_precision']}{seed_note(r)} | {'-' if err is None else f'{err:.4f}'} | {r['trajectories_s']:.0f} s | "
            f"{r['calibration_s']:.0f} s | {moved} | {r['noise_rel_l2_median']:.4f} / {r['noise_rel_l2_p90']:.4f} | "
            f"{r['psnr_per_sample_median_db']:.2f} / {r['psnr_per_sample_p10_db']:.2f} | {fmt(r['fd'], '.1f')} |")
    timing = out.get("sampling_time")
    if timing:
        rows.append("")
        rows.append(f"Sampling alone ({timing['samples']} seeds x {timing['steps']} steps, median of {timing['reps']} "
                    f"interleaved runs, {timing['threads']} threads, {timing['cpu']}): " + ", ".join(
                        f"{p} {s:.1f} s ({timing['vs_fp32'].get(p, 1.0):.2f}x)" for p, s in timing["median_s"].items()))
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="W8A6")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated; fp32 first (the reference)")
    p.add_argument("--json", default=str(ROOT / "docs" / "sampling_precision.json"))
    add_setup_arguments(p)
    p.add_argument("--control-seed", type=int, default=None,
                   help="also calibrate in FP32 from this calibration seed (the held-out set is unchanged)")
    p.add_argument("--time-reps", type=int, default=3, help="interleaved timings of the sampling alone (0: none)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--report", action="store_true", help="print the table from --json only")
    args = p.parse_args(argv)
    out = json.loads(Path(args.json).read_text()) if args.report else run(args)
    print(table(out, args.bits))


if __name__ == "__main__":
    main()
