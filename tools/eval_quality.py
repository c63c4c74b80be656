"""Quality evaluation of ADP-DM against every baseline on the bundled reference model.

    .venv/bin/python tools/eval_quality.py                       # the full grid (slow on 2 cores)
    .venv/bin/python tools/eval_quality.py --bits W8A6,W4A8 --methods percentile,per-step,adpdm-G4

For each bit setting and each method variant: calibrate (shared, cached FP calibration
trajectories: 64 seeds x 100 DDIM steps by default), then evaluate on held-out seeds
(never used in calibration) with DDIM 50 steps:

* noise-prediction relative L2 vs FP per timestep (teacher forced on the FP trajectory) and its mean;
* final-sample PSNR vs the FP sample from the same noise, over all samples and per chunk of
  16 seeds (the spread over seeds);
* Frechet distance (bundled digits classifier features vs the real digits) and its change vs FP;
* calibration time (trajectory sampling excluded and reported once).

Variants (`--methods`): percentile, minmax, uniform-groups-G{2,4,8}, per-step, adpdm-G{2,4,8},
adpdm-G4-last (calibration timestep fixed to the last step: the SRM ablation), adpdm-G4-search (the
partition decided by the paper's relaxed search instead of the default scale-dp), adpdm-G1 (ADP-DM's
learning with one group), adpdm-per-step (one learned scale set per calibration step: the ceiling), and
`<variant>+conv_in` (the input of conv_in quantized too; docs/design.md keeps it FP by default).
Grouped baselines use the percentile statistic, like `percentile`, so only the grouping differs.

Results accumulate in --json (a variant already there is skipped unless --force), so a grid can
be run in pieces; --report rewrites the tables, the per-timestep plot and the sample grids from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from quality_harness import add_setup_arguments, evaluate_model, log, parse_bits, prepare, quant_config  # noqa: E402
from quality_harness import fmt as _f  # noqa: E402

ALL_VARIANTS = [
    "percentile", "minmax", "uniform-groups-G2", "uniform-groups-G4", "uniform-groups-G8", "per-step",
    "adpdm-G1", "adpdm-G2", "adpdm-G4", "adpdm-G8", "adpdm-G4-last", "adpdm-G4-search", "adpdm-per-step",
    "percentile+conv_in", "per-step+conv_in", "adpdm-G1+conv_in", "adpdm-G4+conv_in",
]
ALL_BITS = ["W8A8", "W8A6", "W4A8"]


def parse_variant(name: str) -> dict:
    base, _, extra = name.partition("+")
    spec = {"name": name, "quantize_conv_in": extra == "conv_in", "options": {}, "groups": None, "stat": None}
    if extra not in ("", "conv_in"):
        raise SystemExit(f"unknown variant suffix +{extra}")
    if base in ("percentile", "minmax"):
        spec["method"] = base
    elif base == "per-step":
        spec.update(method="per-step", stat="percentile")
    elif base.startswith("uniform-groups-G"):
        spec.update(method="uniform-groups", groups=int(base.rsplit("G", 1)[1]), stat="percentile")
    elif base == "adpdm-per-step":  # the learned per-step ceiling: one group per step, ADP-DM's learning
        spec.update(method="adpdm", options={"partition": "per-step"})
    elif base.startswith("adpdm-G"):
        rest = base[len("adpdm-G"):]
        g, _, tail = rest.partition("-")
        spec.update(method="adpdm", groups=int(g))
        if tail == "last":
            spec["options"]["calib_step"] = "last"
        elif tail == "search":  # the paper's relaxed search decides the partition (default: scale-dp)
            spec["options"]["partition"] = "search"
        elif tail:
            raise SystemExit(f"unknown adpdm variant {name}")
    else:
        raise SystemExit(f"unknown variant {name}; known: {', '.join(ALL_VARIANTS)}")
    return spec


def variant_method(spec: dict, adpdm_options: Optional[dict] = None):
    """The method config of a parsed variant (`--adpdm-option KEY=VALUE` applies to ADP-DM only)."""
    from calibration.configs import method_config

    values = {k: v for k, v in (("groups", spec["groups"]), ("stat", spec["stat"])) if v is not None}
    values.update(spec["options"])
    if spec["method"] == "adpdm":
        values.update(adpdm_options or {})
    return method_config(spec["method"], values)


def run(args) -> None:
    from calibration import pipeline
    from calibration.quant_unet import quantize_model
    from calibration.trajectories import heldout_seed
    from engines.images import save_grid

    torch.set_num_threads(args.threads)
    store = Path(args.json)
    data = json.loads(store.read_text()) if store.is_file() else {"runs": {}, "meta": {}}
    setup = prepare(args.model, args.calib_samples, args.calib_steps, args.samples, args.eval_steps, args.seed,
                    str(Path(args.cache_dir)))
    loaded, calib, heldout = setup.loaded, setup.calib, setup.heldout
    unet, sc = loaded.unet, loaded.scheduler_config
    feature_fn, real_stats, t_traj = setup.feature_fn, setup.real_stats, setup.calib_trajectories_s
    data["meta"].update({
        "model": args.model, "model_sha256": loaded.sha256, "calib_samples": args.calib_samples,
        "calib_steps": args.calib_steps, "eval_samples": args.samples, "eval_steps": args.eval_steps,
        "seed": args.seed, "heldout_seed": heldout_seed(args.seed), "threads": args.threads,
        "calib_trajectories_s": t_traj if not calib.from_cache else data["meta"].get("calib_trajectories_s"),
    })
    img_dir = Path(args.img_dir)
    save_grid(heldout.final[:64], img_dir / "samples-fp.png", ncols=8, scale=3)
    for bits in args.bits:
        w, a = parse_bits(bits)
        for name in args.methods:
            key = f"{bits}/{name}"
            if key in data["runs"] and not args.force:
                log(f"skip {key} (in {store})")
                continue
            spec = parse_variant(name)
            log(f"== {key}: calibrating ({spec['method']}, groups={spec['groups']}, options={spec['options']})")
            t0 = time.perf_counter()
            result = pipeline.calibrate(
                unet, sc, variant_method(spec, args.adpdm_options), quant_config(w, a, spec["quantize_conv_in"]),
                data=calib, seed=args.seed, batch_size=args.batch_size, log=log,
            )
            t_cal = time.perf_counter() - t0
            qmodel = quantize_model(unet, result=result)
            log(f"   calibrated in {t_cal:.1f} s ({result.num_groups} groups); evaluating")
            t0 = time.perf_counter()
            metrics, images = evaluate_model(qmodel, sc, heldout, feature_fn, real_stats, args.batch_size)
            rec = {
                "bits": bits, "variant": name, "method": spec["method"], "num_groups": result.num_groups,
                "groups": result.groups, "calib_timestep": result.calib_timestep, "calibration_s": t_cal,
                "eval_s": time.perf_counter() - t0, **metrics,
            }
            adp = (result.extra or {}).get("adpdm")
            if adp:
                rec["srm"] = adp.get("srm")
                rec["adpdm_timings"] = result.timings
                rec["group_ranges"] = adp.get("group_ranges")
            data["runs"][key] = rec
            save_grid(images[:64], img_dir / f"samples-{bits}-{name}.png", ncols=8, scale=3)
            log(f"   {key}: rel-L2 median {metrics['noise_rel_l2_median']:.4f} (pooled {metrics['noise_rel_l2']:.4f}, "
                f"max {metrics['noise_rel_l2_max']:.4f}, off-range FP {metrics['off_range_count']})  PSNR {metrics['psnr_vs_fp_db']:.2f} dB "
                f"(chunk std {metrics['psnr_chunk_std_db']:.2f})  FD {_f(metrics['fd'])} vs FP {_f(metrics['fd_fp'])} "
                f"({_f(metrics['fd_delta_pct'], '+.1f')}%)  calib {t_cal:.1f} s")
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(data, indent=1))
    report(data, img_dir)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def judged(r: dict) -> float:
    """The figure targets are judged on: the per-sample median of the noise rel-L2 (mean over
    timesteps per held-out seed); runs recorded before it existed fall back to the pooled mean."""
    return r.get("noise_rel_l2_median", r["noise_rel_l2"])


def _gap(runs: dict, bits: str, variant: str, low: str, high: str) -> float | None:
    """How much of the gap from `low` to `high` (same bits, same conv_in suffix) `variant` closes."""
    suffix = "+conv_in" if variant.endswith("+conv_in") else ""
    try:
        lo, hi = judged(runs[f"{bits}/{low}{suffix}"]), judged(runs[f"{bits}/{high}{suffix}"])
        v = judged(runs[f"{bits}/{variant}"])
    except KeyError:
        return None
    return (lo - v) / (lo - hi) if lo != hi else None


def gap_closed(runs: dict, bits: str, variant: str) -> float | None:
    """percentile -> per-step statistics (the method against the baselines)."""
    return _gap(runs, bits, variant, "percentile", "per-step")


def groups_gap_closed(runs: dict, bits: str, variant: str) -> float | None:
    """ADP-DM G1 -> learned per-step scales, at the same learning: what the groups themselves add
    (None where the per-step scales are no better than one set: no gap for groups to close)."""
    if not variant.startswith("adpdm-G") or variant.startswith("adpdm-G1"):
        return None
    try:
        if judged(runs[f"{bits}/adpdm-per-step"]) >= judged(runs[f"{bits}/adpdm-G1"]):
            return None
    except KeyError:
        return None
    return _gap(runs, bits, variant, "adpdm-G1", "adpdm-per-step")


def _tiles(path: Path, n: int = 64, size: int = 16, ncols: int = 8, scale: int = 3):
    """The first n images of a grid written by save_grid(..., ncols, scale) as floats in [-1, 1]."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path), dtype=np.float64)
    out = []
    for k in range(n):
        r, q = divmod(k, ncols)
        y0, x0 = (1 + r * (size + 1)) * scale, (1 + q * (size + 1)) * scale
        out.append(a[y0: y0 + size * scale: scale, x0: x0 + size * scale: scale] / 127.5 - 1.0)
    return np.stack(out)


def per_sample_psnr(img_dir: Path, key: str, rec: dict) -> dict | None:
    """Median / 10th percentile of per-sample PSNR vs FP (robust to a few samples that turn into
    another digit, which dominate the batch PSNR): from the run's record, or for runs recorded
    before it held them, from the saved 8-bit grids of 64 samples."""
    import numpy as np

    if "psnr_per_sample_median_db" in rec:
        return {"median": rec["psnr_per_sample_median_db"], "p10": rec["psnr_per_sample_p10_db"],
                "below_20db": rec["samples_below_20db"]}
    bits, name = key.split("/", 1)
    fp_path, q_path = img_dir / "samples-fp.png", img_dir / f"samples-{bits}-{name}.png"
    if not (fp_path.is_file() and q_path.is_file()):
        return None
    try:
        a, b = _tiles(fp_path), _tiles(q_path)
    except (ValueError, IndexError):  # a grid of fewer than 64 samples
        return None
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)
    ps = 10 * np.log10(4.0 / np.maximum(mse, 1e-10))
    ps = np.minimum(ps, 60.0)
    return {"median": float(np.median(ps)), "p10": float(np.percentile(ps, 10)),
            "below_20db": int((ps < 20).sum())}


def report(data: dict, img_dir: Path) -> None:
    runs = data["runs"]
    lines2 = ["| bits | method | per-sample PSNR median (dB) | 10th pct | samples < 20 dB |", "|---|---|---:|---:|---:|"]
    for key, r in runs.items():
        ps = per_sample_psnr(img_dir, key, r)
        if ps:
            lines2.append(f"| {r['bits']} | {r['variant']} | {ps['median']:.2f} | {ps['p10']:.2f} | {ps['below_20db']} |")
    lines = ["| bits | method | G | rel-L2 per-sample median | p90 | max | pooled | rel-L2 at t=min | gap closed | groups gap closed "
             "| PSNR vs FP (dB) | chunk std | FD | FD change | off-range FP | calib s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda v: "" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for key, r in runs.items():
        per = r["noise_rel_l2_per_timestep"]
        t_min = min(per, key=lambda t: int(t))
        lines.append(
            f"| {r['bits']} | {r['variant']} | {r['num_groups']} | {_f(r.get('noise_rel_l2_median'), '.4f')} | "
            f"{_f(r.get('noise_rel_l2_p90'), '.4f')} | {_f(r.get('noise_rel_l2_max'), '.4f')} | {r['noise_rel_l2']:.4f} | "
            f"{per[t_min]:.4f} | {pct(gap_closed(runs, r['bits'], r['variant']))} | "
            f"{pct(groups_gap_closed(runs, r['bits'], r['variant']))} | {r['psnr_vs_fp_db']:.2f} | {r['psnr_chunk_std_db']:.2f} | "
            f"{_f(r['fd'])} | {_f(r['fd_delta_pct'], '+.1f')}% | {r.get('off_range_count', 'n/a')} | {r['calibration_s']:.0f} |"
        )
    print("\n".join(lines))
    print("\nPer-sample PSNR vs FP over the held-out seeds (from the run record; runs recorded before it held them: from the 8-bit sample grids):\n")
    print("\n".join(lines2))
    for key, r in runs.items():
        if r.get("srm") and r["variant"] in ("adpdm-G4", "adpdm-G4+conv_in"):  # the other rows' SRM differs little
            srm = r["srm"]
            print(f"\nSRM candidates for {key} (tau* = {srm['tau']}, oracle gap {100 * srm['oracle_gap']:+.1f}%):")
            print("| step | timestep | empirical risk | MMD^2 | structural risk | oracle (held-out) |")
            print("|---:|---:|---:|---:|---:|---:|")
            for k, row in enumerate(srm["rows"]):
                mark = " (tau*)" if k == srm["best_index"] else ""
                print(f"| {row['step']} | {row['timestep']}{mark} | {row['empirical_risk']:.5f} | {row['mmd2']:.4f} | "
                      f"{row['structural_risk']:.5f} | {row['oracle']:.5f} |")
        if r.get("group_ranges") and len(r["group_ranges"]) <= 16:
            print(f"\ngroups of {key}: " + "; ".join(
                f"g{g}: " + ", ".join(f"{lo}-{hi}" for lo, hi in runs_) for g, runs_ in enumerate(r["group_ranges"])))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    bits_list = sorted({r["bits"] for r in runs.values()}, key=lambda b: ALL_BITS.index(b) if b in ALL_BITS else 9)
    fig, axes = plt.subplots(1, len(bits_list), figsize=(6 * len(bits_list), 4.5), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for key, r in runs.items():
            if r["bits"] != bits:
                continue
            per = r["noise_rel_l2_per_timestep"]
            ts = sorted(per, key=int)
            style = "-" if r["method"] == "adpdm" else "--"
            ax.plot([int(t) for t in ts], [per[t] for t in ts], style, label=r["variant"], lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("timestep")
        ax.set_ylabel("noise-pred rel L2 vs FP")
        ax.set_title(bits)
        ax.legend(fontsize=7)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(img_dir / "per-timestep-error.png", dpi=110)
    log(f"wrote {img_dir / 'per-timestep-error.png'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference")
    p.add_argument("--bits", default=",".join(ALL_BITS))
    p.add_argument("--methods", default=",".join(ALL_VARIANTS))
    add_setup_arguments(p)
    p.add_argument("--json", default=str(ROOT / "docs" / "results_data.json"))
    p.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    p.add_argument("--force", action="store_true", help="recompute variants already in --json")
    p.add_argument("--report", action="store_true", help="only print the tables and redraw the plot from --json")
    args = p.parse_args(argv)
    args.bits = [b for b in args.bits.split(",") if b]
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        parse_variant(m)
    args.adpdm_options = {}
    for kv in args.adpdm_option:
        k, _, v = kv.partition("=")
        args.adpdm_options[k] = v
    if args.report:
        report(json.loads(Path(args.json).read_text()), Path(args.img_dir))
        return
    run(args)


if __name__ == "__main__":
    main()
