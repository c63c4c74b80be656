"""Part "calibration" (`--calib-time`): the full ADP-DM calibration time; with the progress
recorder and the tiny ADP-DM settings that the build part shares."""

from __future__ import annotations

import tempfile
import time
from typing import Optional

from .common import log
from .models import load_bench_model, params_m


TINY_ADPDM = {"search_iters": 4, "refine_iters": 2, "srm_candidates": 2, "srm_eval_steps": 2, "srm_heldout_items": 2,
              "search_items": 4}


class Progress:
    """Prints calibration progress (every ~10% of a stage) and records when each stage started and ended."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.stages: dict[str, dict[str, float]] = {}
        self._last: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int, loss: Optional[float] = None) -> None:
        now = time.perf_counter() - self.t0
        st = self.stages.setdefault(stage, {"start_s": round(now, 2), "end_s": round(now, 2), "total": total})
        st["end_s"], st["total"] = round(now, 2), total
        every = max(1, total // 10)
        if done >= total or done - self._last.get(stage, -every) >= every:
            self._last[stage] = done
            log(f"  calibration {stage}: {done}/{total} at {now:.0f} s")


def run_calibration_time(args) -> dict:
    import torch

    from calibration.configs import DataFreeConfig, method_config
    from calibration.pipeline import calibrate

    name = "tiny" if args.quick else "ddpm-cifar10"
    loaded = load_bench_model(name)
    samples, steps = (8, 10) if args.quick else (args.calib_time_samples, args.calib_time_steps)
    options = dict(TINY_ADPDM) if args.quick else dict(args.calib_time_options)
    torch.set_num_threads(args.threads)
    log(f"calibration time: adpdm G=4 on {name} ({params_m(loaded.unet)}M params), {samples} samples x {steps} steps")
    with tempfile.TemporaryDirectory(prefix="bench-speed-calib-") as cache:
        t0 = time.perf_counter()
        prog = Progress(t0)
        result = calibrate(loaded.unet, loaded.scheduler_config, method_config("adpdm", {"groups": 4, **options}),
                           data=DataFreeConfig(samples=samples, steps=steps), seed=0,
                           cond=loaded.default_condition(samples), cache_dir=cache, batch_size=64, progress=prog,
                           log=log)
        wall = time.perf_counter() - t0
    log(f"calibration time: {wall:.1f} s")
    return {"status": "ok", "model": name, "params_m": params_m(loaded.unet), "weights": "random (seed 0)",
            "method": "adpdm", "groups": 4, "calib_samples": samples, "calib_steps": steps, "batch_size": 64,
            "adpdm_options": options or "defaults", "threads": args.threads, "wall_s": round(wall, 2),
            "timings": {k: round(float(v), 2) for k, v in result.timings.items()}, "stages": prog.stages,
            "num_groups": result.num_groups}
