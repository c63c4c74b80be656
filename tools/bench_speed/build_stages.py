"""Part "build": `build_engine` wall time per stage for the reference model (fresh folders)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from .calib_time import TINY_ADPDM, Progress
from .common import log


def run_build(args) -> dict:
    import torch

    from adpdm_export.build_pipeline import build_engine
    from calibration.configs import ADPDMConfig, DataFreeConfig

    torch.set_num_threads(args.threads)
    options = dict(TINY_ADPDM) if args.quick else None
    # the CLI defaults (adpdm, G = 4, 64 samples x 100 steps), or tiny ones with --quick
    method, data = (ADPDMConfig(**options), DataFreeConfig(samples=4, steps=8)) if options else (ADPDMConfig(), DataFreeConfig())
    log(f"build-engine reference: {method.method}, {data.samples} x {data.steps} (fresh folders)")
    with tempfile.TemporaryDirectory(prefix="bench-speed-build-") as tmp:
        t0 = time.perf_counter()
        prog = Progress(t0)
        summary = build_engine("reference", Path(tmp) / "out", method, data=data, backend="ort",
                               targets=("trt", "ort"), cache_dir=str(Path(tmp) / "cache"), progress=prog,
                               say=lambda m: log(f"  {m}"))
        wall = time.perf_counter() - t0
        calib = json.loads((Path(tmp) / "out" / "calibration" / "calibration.json").read_text())
    # "profiles": the graph targets built; the JSON key keeps its historical name
    return {"status": "ok", "model": "reference", "backend": summary.backend, "profiles": ["trt", "ort"],
            "settings": {"method": method.to_dict(), "data": data.to_dict()}, "adpdm_options": options or "defaults",
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
