"""Part "latency": every variant of one model in one process, interleaved round-robin."""

from __future__ import annotations

from typing import Any, Callable

from .common import interleaved, log, median
from .models import DIAGNOSTIC, VARIANT_LABELS, ModelBench, make_inputs, plain_session, session_feeds


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
        if mb.runner_per_group is not None:
            fns["ours-per-group"] = lambda i: mb.runner_per_group(x, ts[i % n])
        if mb.runner_noprepack is not None:
            fns["ours-noprepack"] = lambda i: mb.runner_noprepack(x, ts[i % n])
    return {k: v for k, v in fns.items() if k in args.variants}


def run_latency(mbs: list[ModelBench], args) -> dict:
    rows = []
    for mb in mbs:
        for batch in args.batches:
            fns = make_callables(mb, batch, args)
            log(f"latency {mb.name} batch {batch}: {', '.join(fns)} ({args.rounds} rounds x {args.iters})")
            failed: dict[str, str] = {}
            times = interleaved(fns, args.rounds, args.iters, args.warmup, failed)
            ref = median(times.get("ort-fp32", []))
            for variant in args.variants:
                info = mb.info.get(variant, {})
                row = {"model": mb.name, "batch": batch, "variant": variant, "label": VARIANT_LABELS[variant],
                       "diagnostic": variant in DIAGNOSTIC}
                if variant in times:
                    med = median(times[variant])
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
