"""Quantized quality of the bundled text-conditional model `reference-text`, through the CLI.

    .venv/bin/python tools/eval_reference_text.py --samples 20 --json /tmp/reftext/quant.json
    .venv/bin/python tools/eval_reference_text.py --guidance-scale 1 --json /tmp/reftext/g1.json

For each variant: `adpdm calibrate reference-text` (its defaults: the shipped held-out prompts,
the model's own guidance scale unless --guidance-scale, 64 calibration seeds x 100 DDIM steps) and
`adpdm eval --json` on held-out seeds (DDIM 50; `adpdm eval` has no guidance flag of its own: it
samples at the calibration's guidance scale): prompt fidelity of the quantized model
and of FP from the same noise, PSNR vs FP per sample, FD in classifier features, noise rel-L2 per
sample. Calibration trajectories and held-out FP samples are cached and shared by the variants.
Prints a markdown table (docs/results.md, "reference-text").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "W8A8 adpdm G4": ["--method", "adpdm", "--w-bits", "8", "--a-bits", "8"],
    "W8A6 adpdm G4": ["--method", "adpdm", "--w-bits", "8", "--a-bits", "6"],
    "W8A6 adpdm G1": ["--method", "adpdm", "--groups", "1", "--w-bits", "8", "--a-bits", "6"],
    "W8A6 percentile": ["--method", "percentile", "--w-bits", "8", "--a-bits", "6"],
}


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "adpdm_export.cli", *args], capture_output=True, text=True, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20, help="held-out seeds of `adpdm eval`")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of `adpdm eval`")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of " + "; ".join(VARIANTS))
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance of calibration and evaluation (default: the model's own)")
    p.add_argument("--work", type=Path, default=Path("/tmp/adpdm-reftext-eval"), help="calibration folders")
    p.add_argument("--json", type=Path, default=None, help="results (accumulated: variants there are skipped)")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    guidance = [] if args.guidance_scale is None else ["--guidance-scale", f"{args.guidance_scale:g}"]
    if guidance:
        other = {n: m.get("guidance_scale") for n, m in results.items() if m.get("guidance_scale") != args.guidance_scale}
        if other:
            p.error(f"{args.json} holds results at another guidance scale ({other}); give another --json")
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}")
        if name in results:
            continue
        out = args.work / (name.replace(" ", "_") + (f"_g{args.guidance_scale:g}" if guidance else ""))
        t0 = time.time()
        r = cli("calibrate", "reference-text", "--out", str(out), "--no-progress", *guidance, *VARIANTS[name])
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        t1 = time.time()
        r = cli("eval", str(out), "--json", "--samples", str(args.samples), "--steps", str(args.steps), "--no-progress")
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        m = json.loads(r.stdout)
        m.update(calibrate_seconds=round(t1 - t0, 1), eval_seconds=round(time.time() - t1, 1))
        results[name] = m
        print(f"{name}: guidance {m['guidance_scale']:g}, fidelity {m['prompt_fidelity']:.3f} (FP "
              f"{m['prompt_fidelity_fp']:.3f}), PSNR median {m['psnr_vs_fp_db_median']:.2f}, calibrate {t1 - t0:.0f}s",
              flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("| variant | prompt fidelity (FP) | agreement with FP | p(asked) median / p10 | PSNR vs FP per sample: median / min (dB) "
          "| FD (FP) | noise rel-L2 per sample: median / max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m in results.items():
        print(f"| {name} | {m['prompt_fidelity']:.3f} ({m['prompt_fidelity_fp']:.3f}) | {m['prompt_agreement']:.3f} | "
              f"{m['prompt_prob_median']:.3f} / {m['prompt_prob_p10']:.3f} | {m['psnr_vs_fp_db_median']:.2f} / "
              f"{m['psnr_vs_fp_db_min']:.2f} | {m['fd']:.1f} ({m['fd_fp']:.1f}) | {m['noise_rel_l2_median']:.4f} / "
              f"{m['noise_rel_l2_max']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
