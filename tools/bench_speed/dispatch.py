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


class _NullBinding:
    """Stands in for an IOBinding of the null one-session: binds nothing, holds the precomputed output."""

    def __init__(self, out):
        self._out = out

    def bind_ortvalue_input(self, name, value):
        pass

    def bind_cpu_input(self, name, array):
        pass

    def bind_output(self, name, device):
        pass

    def clear_binding_outputs(self):
        pass

    def get_outputs(self):
        return [self._out]


class _NullOneSession:
    """Stands in for the one-session backend's session: its runs return a precomputed OrtValue."""

    def __init__(self, out):
        self._out = out

    def io_binding(self):
        return _NullBinding(self._out)

    def run_with_iobinding(self, binding):
        pass


def _one_session_row(mb: ModelBench, runner, batch: int, args) -> dict:
    """The one-session runner (engines/ort_one_session.py) vs a bare `run_with_iobinding` of its session with
    the same group constants bound, and the runner's own cost with the session swapped for a null one."""
    import threading

    be = runner.group_backend
    x, ts = make_inputs(mb, batch)
    t = ts[0]
    k = int(runner.group_of(t)[0])
    sess, out_name = be.session, be.output_name
    io = sess.io_binding()
    for name, value in be._constants[k].items():
        io.bind_ortvalue_input(name, value)
    x_np, t_np = x.numpy(), t.numpy()
    io.bind_cpu_input("sample", x_np)
    io.bind_cpu_input("timestep", t_np)
    io.bind_output(out_name, "cpu")
    fns = {"runner": lambda i, r=runner, x=x, t=t: r(x, t),
           "bare": lambda i, s=sess, b=io: s.run_with_iobinding(b)}
    times = interleaved(fns, args.rounds, args.iters, args.warmup, {})
    out = io.get_outputs()[0]
    local = be._local
    be.session, be._local = _NullOneSession(out), threading.local()  # fresh bindings, made by the null session
    try:
        null_t = interleaved({"runner-null": lambda i, r=runner, x=x, t=t: r(x, t)}, 1, args.null_reps, 5, {})["runner-null"]
    finally:
        be.session, be._local = sess, local
    return _row(mb, batch, k, t, times, null_t, "one session")


def _row(mb, batch, k, t, times, null_t, backend) -> dict:
    r, b, nm = median(times["runner"]), median(times["bare"]), median(null_t)
    row = {"model": mb.name, "batch": batch, "group": k, "timestep": int(t[0]), "status": "ok", "backend": backend,
           "runner_ms": [round(v, 4) for v in times["runner"]], "bare_ms": [round(v, 4) for v in times["bare"]],
           "runner_null_ms": [round(v, 5) for v in null_t],
           "runner_median_ms": round(r, 4), "bare_median_ms": round(b, 4),
           "difference_ms": round(r - b, 4), "difference_pct": round(100 * (r - b) / b, 3),
           "overhead_ms": round(nm, 5), "overhead_pct": round(100 * nm / b, 4)}
    log(f"dispatch {mb.name} b{batch} ({backend}): runner {r:.3f} ms, bare {b:.3f} ms, runner-only cost "
        f"{nm * 1e3:.1f} us ({row['overhead_pct']:.3f}% of a step)")
    return row


def run_dispatch(mbs: list[ModelBench], args) -> dict:
    """Runner vs a bare run of the same group session, interleaved; and the runner with a null session."""
    from engines.ort_backend import OrtNoisePredictor

    rows = []
    for mb in mbs:
        if mb.runner is None:
            rows.append({"model": mb.name, "status": "failed", "reason": mb.info.get("ours", {}).get("reason")})
            continue
        runner = mb.runner
        if not hasattr(runner.group_backend, "sessions"):  # the one-session backend (the default)
            rows += [_one_session_row(mb, runner, batch, args) for batch in args.batches]
            continue
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
            row = _row(mb, batch, k, t, times, null_t, "per-group sessions")
            rows.append(row)
    return {"rows": rows, "null_reps": args.null_reps}
