"""The quality cost of each calibration budget level, and how close the cost estimate is.

    .venv/bin/python tools/budget_levels.py --bits W8A6 --json docs/budget_levels.json

For level k = 0 (the defaults) .. len(BUDGET_LEVELS), ADP-DM is calibrated data-free on the bundled
reference model with the first k levels of `calibration.cost_estimate.BUDGET_LEVELS` applied
(trajectories sampled each time, no cache, so the estimate and the measured time cover the same
work), then judged on held-out seeds (never used in calibration; DDIM 50) per sample: the
noise-prediction relative L2 vs FP (median and p90 over seeds), PSNR vs the FP sample (median and
p10), and the Frechet distance in the digits classifier's features. Each record also holds the
estimate the run printed and the measured calibration time. docs/method.md ("Calibration
budget") holds the table this prints.
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

from tools.quality_harness import evaluate_model, fmt, log, quant_config, reference_sweep  # noqa: E402


def levels_config(k: int):
    from calibration.configs import ADPDMConfig, DataFreeConfig
    from calibration.cost_estimate import BUDGET_LEVELS, apply_level

    method, data = ADPDMConfig(), DataFreeConfig()
    for level in BUDGET_LEVELS[:k]:
        method, data = apply_level(level, method, data)
    return method, data


def run(args) -> dict:
    from calibration import pipeline
    from calibration.cost_estimate import BUDGET_LEVELS
    from calibration.quant_unet import quantize_model

    store, out, setup, (w, a) = reference_sweep(args)
    loaded = setup.loaded
    for k in range(len(BUDGET_LEVELS) + 1):
        key = f"{args.bits}/L{k}"
        if key in out["runs"] and not args.force:
            log(f"skip {key}")
            continue
        method, data = levels_config(k)
        seen = []
        t0 = time.perf_counter()
        result = pipeline.calibrate(loaded.unet, loaded.scheduler_config, method, quant_config(w, a, False), data=data,
                                    seed=args.seed, cond=loaded.default_condition(data.samples),
                                    batch_size=args.batch_size, on_estimate=seen.append)
        calib_s = time.perf_counter() - t0
        qmodel = quantize_model(loaded.unet, result=result)
        metrics, _ = evaluate_model(qmodel, loaded.scheduler_config, setup.heldout, setup.feature_fn,
                                    setup.real_stats, args.batch_size)
        out["runs"][key] = {
            "level": k, "applied": [lv.name for lv in BUDGET_LEVELS[:k]], "method": method.to_dict(),
            "data": data.to_dict(), "estimate": seen[0].to_dict(), "calibration_s": calib_s,
            "num_groups": result.num_groups, **metrics,
        }
        log(f"{key}: est {seen[0].seconds:.1f} s, took {calib_s:.1f} s; rel-L2 median "
            f"{metrics['noise_rel_l2_median']:.4f} PSNR median {metrics['psnr_per_sample_median_db']:.2f} dB "
            f"FD {fmt(metrics['fd'], '.1f')}")
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(out, indent=1))
    return out


def table(out: dict, bits: str) -> str:
    rows = ["| level | applied | samples x steps | estimate | measured | rel-L2 median / p90 | PSNR median / p10 (dB) | FD |",
            "|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(out["runs"].items(), key=lambda kv: kv[1]["level"]):
        if not key.startswith(bits + "/"):
            continue
        d = r["data"]
        rows.append(
            f"| L{r['level']} | {r['applied'][-1] if r['applied'] else 'defaults'} | {d['samples']} x {d['steps']} | "
            f"{r['estimate']['seconds']:.0f} s | {r['calibration_s']:.0f} s | "
            f"{r['noise_rel_l2_median']:.4f} / {r['noise_rel_l2_p90']:.4f} | "
            f"{r['psnr_per_sample_median_db']:.2f} / {r['psnr_per_sample_p10_db']:.2f} | {fmt(r['fd'], '.1f')} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="W8A6")
    p.add_argument("--json", default=str(ROOT / "docs" / "budget_levels.json"))
    p.add_argument("--samples", type=int, default=64, help="held-out seeds")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"), help="held-out trajectory cache")
    p.add_argument("--force", action="store_true")
    p.add_argument("--report", action="store_true", help="print the table from --json only")
    args = p.parse_args(argv)
    out = json.loads(Path(args.json).read_text()) if args.report else run(args)
    print(table(out, args.bits))


if __name__ == "__main__":
    main()
