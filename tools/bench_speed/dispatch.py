"""Part "dispatch": the runner vs a bare run of its group session, and the runner's own cost alone."""

from __future__ import annotations

from .common import interleaved, log, median
from .models import ModelBench, make_inputs, session_feeds


class _NullSession:
    """Stands in for an onnxruntime session and returns a precomputed output: the runner's own cost alone."""

    def __init__(self, real, out):
        self._inputs = real.get_inputs()
        self._out = out

    def get_inputs(self):
        return self._inputs

    def run(self, names, feeds):
        return [self._out]


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
            r, b, nm = median(times["runner"]), median(times["bare"]), median(null_t)
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
