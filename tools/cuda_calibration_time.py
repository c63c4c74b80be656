"""Calibration on the GPU (`--device cuda`) against the CPU: wall time per stage, peak GPU memory, and
how far the two calibrations differ (issue 15: the CUDA path), and the same on the GPU with the
trajectories sampled in fp16 / bf16 (`--precisions`, calibration.sampling_precision). Needs a CUDA GPU and a CUDA build of
torch; elsewhere it says why and exits with status 2. The record goes to docs/cuda_calibration_time.json.

    .venv/bin/python tools/cuda_calibration_time.py --model ddpm-cifar10 --samples 16 --steps 20
    .venv/bin/python tools/cuda_calibration_time.py --model sd15 --method uniform-groups --skip-cpu
    .venv/bin/python tools/cuda_calibration_time.py --model sd15 --precisions fp32,fp16,bf16 --skip-cpu

Models: tools/bench_speed/models.py (random weights: timing does not need a trained model). The GPU
tests of the same path: tests/test_cuda_calibration.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.stage_memory import add_method_args, method_from_args  # noqa: E402  (after the path setup)

DEFAULT_JSON = ROOT / "docs" / "cuda_calibration_time.json"


def run_one(model: str, device: str, method, data, threads: int) -> tuple[dict, object]:
    import torch

    from calibration.pipeline import calibrate
    from tools.bench_speed.calib_time import Progress
    from tools.bench_speed.models import load_bench_model, params_m

    torch.set_num_threads(threads)
    loaded = load_bench_model(model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    prog = Progress(t0)
    result = calibrate(loaded.unet, loaded.scheduler_config, method, data=data, seed=0,
                       cond=loaded.default_condition(data.samples), device=device, progress=prog)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rec = {"device": device, "sampling_precision": result.config["calibration"]["sampling_precision"],
           "precision_check": result.config["calibration"].get("sampling_precision_check"), "params_m": params_m(loaded.unet), "wall_s": round(wall, 2),
           "timings": {k: round(float(v), 2) for k, v in result.timings.items()}, "stages": prog.stages}
    if device == "cuda":
        rec["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(f"{model} on {device}, sampled in {rec['sampling_precision']}: {wall:.1f} s", flush=True)
    return rec, result


def compare(cpu, gpu) -> dict:
    """Same timestep table or not, and the median / largest relative difference of the activation scales."""
    import torch

    rel = []
    for name, s in cpu.activation_scales.items():
        g = gpu.activation_scales[name].cpu().double()
        c = s.cpu().double()
        rel.append(((g - c).abs() / c.clamp_min(1e-12)))
    rel = torch.cat(rel) if rel else torch.zeros(1)
    return {"same_table": bool(torch.equal(cpu.timestep_to_group.cpu(), gpu.timestep_to_group.cpu())),
            "scale_rel_diff_median": float(rel.median()), "scale_rel_diff_max": float(rel.max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ddpm-cifar10")
    add_method_args(p)
    p.set_defaults(groups=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the CPU run and the GPU run's host side)")
    p.add_argument("--skip-cpu", action="store_true", help="time the GPU only (a model too slow for this CPU)")
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated sampling precisions of the GPU runs (fp32 first: the others are compared with it)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)

    from engines.platform import cuda_status

    ok, why = cuda_status()
    if not ok:
        print(f"cuda_calibration_time: needs a CUDA GPU: {why}", file=sys.stderr)
        return 2
    from calibration.configs import DataFreeConfig

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or precisions[0] != "fp32":
        p.error("--precisions must start with fp32 (the run the others are compared with)")
    data = DataFreeConfig(samples=args.samples, steps=args.steps)
    runs, results = {}, {}
    plan = [(f"cuda-{q}", "cuda", q) for q in precisions] + ([] if args.skip_cpu else [("cpu-fp32", "cpu", "fp32")])
    for key, device, precision in plan:
        runs[key], results[key] = run_one(args.model, device, method_from_args(args),
                                          dataclasses.replace(data, precision=precision), args.threads)
    out = {"model": args.model, "gpu": why, "method": method_from_args(args).to_dict(), "data": data.to_dict(),
           "runs": runs, "command": "python tools/cuda_calibration_time.py " + " ".join(argv or sys.argv[1:])}
    if "cpu-fp32" in results:
        out["cpu_vs_cuda"] = compare(results["cpu-fp32"], results["cuda-fp32"])
        out["speedup"] = round(runs["cpu-fp32"]["wall_s"] / runs["cuda-fp32"]["wall_s"], 2)
    for q in precisions[1:]:  # each half-precision GPU run against the FP32 GPU run
        out[f"cuda_{q}_vs_fp32"] = {**compare(results["cuda-fp32"], results[f"cuda-{q}"]),
                                    "trajectories_speedup": round(runs["cuda-fp32"]["timings"]["trajectories_s"]
                                                                  / max(runs[f"cuda-{q}"]["timings"]["trajectories_s"],
                                                                        1e-9), 2)}
    text = json.dumps(out, indent=1)
    print(text)
    args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
