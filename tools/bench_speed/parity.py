"""Part "parity": the runner's one onnxruntime session (engines/ort_one_session.py, the default) against one
session per group (ort_options sessions='per-group') on every group of our G-group build of each model, and on a
batch mixing every group: outputs must be equal (the export checks the same on its parity inputs)."""

from __future__ import annotations

from .common import log


def run_parity(mbs, args) -> dict:
    import torch

    from engines.runner import TimestepDispatchRunner

    rows = []
    for mb in mbs:
        build = mb.builds.get(args.groups)
        if build is None:
            rows.append({"model": mb.name, "status": "failed", "reason": "no G-group build of ours"})
            continue
        one = TimestepDispatchRunner(build, backend="ort", threads=args.threads, verify="size")
        per = TimestepDispatchRunner(build, backend="ort", threads=args.threads, verify="size",
                                     ort_options={"sessions": "per-group"})
        table = one.manifest.timestep_to_group
        C, H, W = one.sample_shape
        g = torch.Generator().manual_seed(0)
        cases = []
        for k in range(one.num_groups):
            ts = [t for t in range(len(table)) if table[t] == k]
            cases.append((f"group {k}", [ts[0], ts[len(ts) // 2], ts[-1]]))
        firsts = [table.index(k) for k in range(one.num_groups)]
        lasts = [len(table) - 1 - table[::-1].index(k) for k in range(one.num_groups)]
        cases.append(("mixed", [v for pair in zip(lasts, firsts) for v in pair]))
        for name, ts in cases:
            x = torch.randn((len(ts), C, H, W), generator=g)
            t = torch.tensor(ts, dtype=torch.int64)
            a, b = one(x, t), per(x, t)
            d = (a - b).abs()
            row = {"model": mb.name, "case": name, "timesteps": ts, "status": "ok", "exact": bool(torch.equal(a, b)),
                   "max_abs": float(d.max()), "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)),
                   "backend": type(one.group_backend).__name__}
            rows.append(row)
            log(f"parity {mb.name} {name}: exact {row['exact']} (max |diff| {row['max_abs']:.3g})")
        one.close()
        per.close()
    return {"rows": rows, "all_exact": all(r.get("exact") for r in rows if r.get("status") == "ok")}
