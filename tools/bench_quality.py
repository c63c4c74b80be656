"""Quality of adpdm against the quantizers a user would pick instead, on the bundled reference model.

    .venv/bin/python tools/bench_quality.py            # the full benchmark (about an hour on 2 cores)
    .venv/bin/python tools/bench_quality.py --quick    # a few minutes: tiny budget, W8A8, few methods

Every method gets the same calibration budget: the (x_t, t) pairs of the FP sampler's calibration
trajectories (64 seeds x 100 DDIM steps = 6400 FP forward passes by default, computed once and
cached), the same scope (per-tensor inputs of Conv2d / Linear, per-channel weights, the layers of
calibration.qconfig.DEFAULT_FP_LAYERS kept FP) and the same held-out seeds (DDIM 50 steps). Each
runs twice: with conv_in's input FP (our default) and quantized ("+conv_in"), since that one
tensor dominates the error near t = 0.

Methods: ours (`percentile`, `uniform-groups-G4`, `adpdm-G1` (ADP-DM's learning, one group), `adpdm-G4`, `per-step`, as in
tools/eval_quality.py) and the peers of tools/bench_peers (onnxruntime quantize_static, NVIDIA
ModelOpt, torchao PT2E, optimum-quanto) at the bit widths each supports. A peer that is not
installed or fails is recorded with the reason and the rest goes on.

Metrics (tools/quality_harness.py): noise-prediction relative L2 vs FP (teacher forced): per
held-out sample (mean over timesteps) its median (the figure findings are judged on), p90 and max,
the pooled value, and per timestep bucket; the count of FP held-out trajectories that leave the data range; final-sample PSNR vs FP (all samples, spread over chunks of 16 seeds,
per-sample median); Frechet distance change vs FP; calibration wall time (trajectories excluded:
every method is handed the same precomputed budget).

Text-to-image path (`--model reference-text`): every method calibrates on the guided calibration
trajectories `adpdm calibrate reference-text` samples (the shipped prompts in turn, negative prompt "",
the model's own guidance unless --guidance-scale; both guidance halves with their encoder_hidden_states,
128 UNet items per step for 64 seeds) and is scored as `adpdm eval` scores it (same held-out seeds,
prompts and guidance; VAE decode; prompt fidelity and agreement with FP by the digits classifier, PSNR
vs FP per decoded sample, FD, noise rel-L2 per sample: tools/quality_harness.evaluate_text_model).

Results go to --json (docs/bench_quality.json; a row already there is skipped unless --force; models
other than `reference` in their own section of it, "models") and docs/benchmarks.md is redrawn
(tools/bench_report.py) unless --no-docs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from quality_harness import (add_setup_arguments, evaluate_model, evaluate_text_model, fmt, log, parse_bits,  # noqa: E402
                             prepare, quant_config)

OURS = ["percentile", "uniform-groups-G4", "adpdm-G1", "adpdm-G4", "per-step"]
# "<variant>@ort": our CPU-target graph (what the runner serves with onnxruntime), for the wide-scope rows;
# the text is recorded in docs/bench_quality.json rows, so it keeps its historical wording
OURS_TARGET_SCOPE = "wider: our CPU profile (Conv/MatMul outputs quantized too, the graph bench_speed times)"
BITS = ["W8A8", "W8A6"]
# timestep buckets of the per-bucket error: the last steps decide the image
BUCKETS = [(0, 99), (100, 299), (300, 599), (600, 999)]
QUICK = {
    "calib_samples": 8, "calib_steps": 10, "samples": 8, "eval_steps": 10,
    "bits": ["W8A8"], "conv_in": [True], "ours": ["percentile", "adpdm-G4"],
    "adpdm_options": {"search_iters": 10, "refine_iters": 5, "srm_candidates": 2, "srm_heldout_items": 2},
}


def row_key(bits: str, family: str, variant: str, conv_in_fp: bool) -> str:
    return f"{bits}/{family}:{variant}{'' if conv_in_fp else '+conv_in'}"


def bucket_errors(per_timestep: dict[str, float]) -> dict[str, float | None]:
    out = {}
    for lo, hi in BUCKETS:
        vals = [v for t, v in per_timestep.items() if lo <= int(t) <= hi]
        out[f"{lo}-{hi}"] = sum(vals) / len(vals) if vals else None
    return out


def scope_for(w: int, a: int, conv_in_fp: bool):
    from tools.bench_peers import Scope

    cfg = quant_config(w, a, quantize_conv_in=not conv_in_fp)
    return Scope(w_bits=w, a_bits=a, fp_layers=tuple(cfg.fp_layers), conv_in_fp=conv_in_fp)


def calibrate_ours(setup, name: str, w: int, a: int, conv_in_fp: bool, args) -> tuple[Any, float, dict]:
    """(quantized model, calibration seconds, extra) for one of our methods."""
    from calibration import pipeline
    from calibration.quant_unet import quantize_model
    from eval_quality import parse_variant, variant_method

    base, _, target = name.partition("@")
    spec = parse_variant(base)
    loaded = setup.loaded
    t0 = time.perf_counter()
    result = pipeline.calibrate(
        loaded.unet, loaded.scheduler_config, variant_method(spec, args.adpdm_options), quant_config(w, a, not conv_in_fp),
        data=setup.calib, seed=args.seed, batch_size=args.batch_size, log=log if args.verbose else None,
    )
    t_cal = time.perf_counter() - t0
    extra = {"num_groups": result.num_groups, "calib_timestep": result.calib_timestep}
    qmodel = quantize_model(loaded.unet, result=result)
    if target:  # "@ort": the CPU target (output quantizers too), simulated; parity with the graph: docs/export.md
        from calibration.quant_unet import set_target

        set_target(qmodel, target)
        extra["profile"] = target  # the graph target; the JSON key keeps its historical name
    return qmodel, t_cal, extra


def plan(args) -> list[dict[str, Any]]:
    """Every (bits, family, variant, conv_in) row the run will score, peers resolved."""
    from tools.bench_peers import all_peers

    rows = []
    peers = [] if args.no_peers else all_peers()
    for bits in args.bits:
        for conv_in_fp in args.conv_in:
            for name in args.ours:
                rows.append({"bits": bits, "family": "ours", "variant": name, "conv_in_fp": conv_in_fp, "peer": None,
                             "own_scope": OURS_TARGET_SCOPE if name.endswith("@ort") else None})
            for peer in peers:
                if bits not in peer.BITS:
                    continue
                variants = [v for v in peer.VARIANTS
                            if not args.peers or peer.NAME in args.peers or f"{peer.NAME}:{v}" in args.peers]
                if args.quick:
                    variants = variants[:1]
                for v in variants:
                    rows.append({"bits": bits, "family": peer.NAME, "variant": v, "conv_in_fp": conv_in_fp, "peer": peer,
                                 "own_scope": getattr(peer, "OWN_SCOPE", {}).get(v)})
    return rows


def section_name(model: str, guidance_scale: float | None) -> str:
    """The JSON section of a run: the model's name, with the guidance when not the model's own."""
    return model if guidance_scale is None else f"{model}@guidance{guidance_scale:g}"


def model_section(data: dict[str, Any], model: str, fresh: bool = False) -> dict[str, Any]:
    """Where `model`'s rows live in the JSON (model: a section_name): the top level for `reference` (the
    benchmark's own model), data["models"][model] for any other (e.g. the text path's `reference-text`).
    fresh: emptied."""
    if model == "reference":
        if fresh:
            for k in ("rows", "meta", "unavailable"):
                data.pop(k, None)
        sec = data
    else:
        models = data.setdefault("models", {})
        if fresh:
            models.pop(model, None)
        sec = models.setdefault(model, {})
    sec.setdefault("rows", {})
    return sec


def run(args) -> dict[str, Any]:
    from bench_report import machine_info

    from calibration.trajectories import heldout_seed
    from tools.bench_peers import CalibData, all_peers

    torch.set_num_threads(args.threads)
    store = Path(args.json)
    whole = json.loads(store.read_text()) if store.is_file() else {}
    data = model_section(whole, section_name(args.model, args.guidance_scale), fresh=args.fresh)
    setup = prepare(args.model, args.calib_samples, args.calib_steps, args.samples, args.eval_steps, args.seed,
                    str(Path(args.cache_dir)), guidance_scale=args.guidance_scale)
    loaded = setup.loaded
    calib = CalibData(setup.calib, batch_size=args.batch_size)
    unavailable = {}
    for peer in ([] if args.no_peers else all_peers()):
        why = peer.unavailable()
        if why:
            unavailable[peer.NAME] = why
            log(f"peer {peer.NAME} skipped: {why}")
    data["unavailable"] = unavailable
    commands = list((data.get("meta") or {}).get("commands", []))
    commands.append("python tools/bench_quality.py " + " ".join(shlex.quote(a) for a in args.argv))
    data["meta"] = {
        "commands": commands,  # every invocation that added rows to this JSON, in order
        "quick": args.quick, "model": args.model, "model_sha256": loaded.sha256,
        "calib_samples": args.calib_samples, "calib_steps": args.calib_steps,
        "calib_forward_passes": calib.num_forward_passes, "eval_samples": args.samples,
        "eval_steps": args.eval_steps, "seed": args.seed, "heldout_seed": heldout_seed(args.seed),
        "calib_trajectories_s": setup.calib_trajectories_s, "buckets": BUCKETS,
        "machine": machine_info(args.threads),
    }
    if setup.text is not None:
        data["meta"].update(guidance_scale=setup.guidance_scale, calib_items_per_step=setup.calib.num_samples,
                            text_note=setup.text.note)
    workroot = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    for row in plan(args):
        bits, family, variant, conv_in_fp, peer = row["bits"], row["family"], row["variant"], row["conv_in_fp"], row["peer"]
        key = row_key(bits, family, variant, conv_in_fp)
        if peer is not None and peer.NAME in unavailable:
            continue
        if key in data["rows"] and not args.force:
            log(f"skip {key} (in {store})")
            continue
        w, a = parse_bits(bits)
        log(f"== {key}: calibrating")
        rec: dict[str, Any] = {"bits": bits, "family": family, "variant": variant, "conv_in_fp": conv_in_fp,
                               "own_scope": row["own_scope"], "forward_passes": calib.num_forward_passes, "notes": [], "error": None}
        try:
            if peer is None:
                model, t_cal, extra = calibrate_ours(setup, variant, w, a, conv_in_fp, args)
                notes = []
            else:
                workdir = workroot / key.replace("/", "_").replace(":", "_").replace("+", "_")
                workdir.mkdir(parents=True, exist_ok=True)
                pm = peer.quantize(loaded.unet, calib, scope_for(w, a, conv_in_fp), variant, workdir, log=log)
                model, t_cal, extra, notes = pm.model, pm.calibration_s, dict(pm.extra), list(pm.notes)
            log(f"   calibrated in {t_cal:.1f} s; evaluating")
            t0 = time.perf_counter()
            if setup.text is not None:
                metrics = evaluate_text_model(model, setup, args.batch_size)
            else:
                metrics, _ = evaluate_model(model, loaded.scheduler_config, setup.heldout, setup.feature_fn,
                                            setup.real_stats, args.batch_size)
            rec.update(calibration_s=t_cal, eval_s=time.perf_counter() - t0, extra=extra, notes=notes, **metrics)
            rec["noise_rel_l2_buckets"] = bucket_errors(metrics["noise_rel_l2_per_timestep"])
            log(f"   {key}: rel-L2 per sample median {rec['noise_rel_l2_median']:.4f}  PSNR per sample median "
                f"{fmt(rec.get('psnr_vs_fp_db_median', rec.get('psnr_per_sample_median_db')), '.2f')} dB  "
                f"fidelity {fmt(rec.get('prompt_fidelity'))}  calib {t_cal:.1f} s")
        except Exception as e:  # a peer that breaks is a result too: recorded, and the rest goes on
            rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            log(f"   {key} FAILED: {rec['error']}")
            if args.verbose:
                traceback.print_exc()
        data["rows"][key] = rec
        save(store, whole)
    save(store, whole)
    return whole


def save(store: Path, whole: dict) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(whole, indent=1))


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def _label(r: dict) -> str:
    return f"{r['family']}:{r['variant']}"


def _sorted_rows(rows: dict) -> list[dict]:
    def order(r):
        return (r["bits"] != "W8A8", not r["conv_in_fp"], r["family"] != "ours", r["family"], r["variant"])
    return sorted(rows.values(), key=order)


def plot(data: dict, img_dir: Path, name: str = "bench-quality-per-timestep.png") -> str | None:
    """Per-timestep error per method (conv_in FP rows), one panel per bit width; the PNG's name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in _sorted_rows(data["rows"]) if not r.get("error") and r.get("noise_rel_l2_per_timestep")]
    bits_list = sorted({r["bits"] for r in rows}, key=lambda b: BITS.index(b) if b in BITS else 9)
    if not bits_list:
        return None
    panels = [(b, c) for b in bits_list for c in (True, False)
              if any(r["bits"] == b and r["conv_in_fp"] == c for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (bits, conv_in_fp) in zip(axes[0], panels):
        for r in rows:
            if r["bits"] != bits or r["conv_in_fp"] != conv_in_fp:
                continue
            per = r["noise_rel_l2_per_timestep"]
            ts = sorted(per, key=int)
            ax.plot([int(t) for t in ts], [per[t] for t in ts], "-" if r["family"] == "ours" else "--",
                    label=_label(r), lw=1.3 if r["family"] == "ours" else 1.0)
        ax.set_yscale("log")
        ax.set_xlabel("timestep")
        ax.set_ylabel("noise-pred rel L2 vs FP")
        ax.set_title(f"{bits}, conv_in {'FP' if conv_in_fp else 'quantized'}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(img_dir / name, dpi=100)
    plt.close(fig)
    return name


def findings(data: dict) -> list[str]:
    """Plain sentences computed from the rows: adpdm-G4 against the best peer on the shared scope
    (noise error judged on the per-sample median)."""
    from eval_quality import judged as _judged
    out = []
    rows = [r for r in data["rows"].values() if not r.get("error")]
    b0 = "0-99"
    for bits in BITS:
        for conv_in_fp in (True, False):
            same = [r for r in rows if r["bits"] == bits and r["conv_in_fp"] == conv_in_fp]
            ours = next((r for r in same if r["family"] == "ours" and r["variant"] == "adpdm-G4"), None)
            peers = [r for r in same if r["family"] != "ours" and not r.get("own_scope")]
            if not ours or not peers:
                continue
            best = min(peers, key=_judged)
            best_psnr = max(peers, key=lambda r: r["psnr_vs_fp_db"])
            d = ours["psnr_vs_fp_db"] - best_psnr["psnr_vs_fp_db"]
            noise = max(1.0, ours["psnr_chunk_std_db"], best_psnr["psnr_chunk_std_db"])
            scope = "conv_in FP" if conv_in_fp else "conv_in quantized"
            out.append(
                f"{bits}, {scope}: adpdm-G4 has {_judged(ours) / _judged(best):.2f}x the noise error "
                f"({'per-sample median' if 'noise_rel_l2_median' in ours else 'pooled: a row recorded before per-sample figures'}) of "
                f"the best peer on the same scope, {_label(best)} ({_judged(ours):.4f} vs {_judged(best):.4f}; "
                f"t < 100: {fmt(ours['noise_rel_l2_buckets'][b0], '.4f')} vs {fmt(best['noise_rel_l2_buckets'][b0], '.4f')}). "
                f"Final-sample PSNR {ours['psnr_vs_fp_db']:.2f} dB vs the best peer's {best_psnr['psnr_vs_fp_db']:.2f} dB "
                f"({_label(best_psnr)}): {d:+.2f} dB, "
                f"{'within' if abs(d) < noise else 'outside'} the seed noise ({noise:.1f} dB, the larger chunk std)."
            )
    return out


def render_markdown(data: dict, img_dir: Path, rel: str) -> str:
    """The "## Quality" section of docs/benchmarks.md (and its plot, written to img_dir): the
    `reference` rows, then each other model's (data["models"]; the text path's table)."""
    parts = ["## Quality", ""]
    if data.get("rows"):
        parts.append(render_reference(data, img_dir, rel))
    for name, sec in (data.get("models") or {}).items():
        if "guidance_scale" in sec.get("meta", {}):  # a text-to-image pipeline's rows
            parts.append(render_text_model(name, sec))
        else:  # another unconditional model: the reference tables, under its name
            parts += [f"### {name}", "", render_reference(sec, img_dir, rel, f"bench-quality-per-timestep-{name}.png")]
    return "\n".join(parts)


def _commands_and_machine(m: dict) -> list[str]:
    from bench_report import machine_markdown

    return ["Commands (in order; each adds the rows not yet in the JSON):", "",
            *[f"    {c}" for c in m.get("commands", [m.get("command")])], "",
            *(["(quick mode: a smoke run, not a result)", ""] if m.get("quick") else [])], \
        [f"Machine: {machine_markdown(m.get('machine', {}))}", ""]


def _peer_notes(sec: dict) -> list[str]:
    """Peers not run, and what each peer needed (its modules' notes), for one model's rows."""
    lines = []
    if sec.get("unavailable"):
        lines += ["Peers not run:", ""] + [f"- {k}: {v}" for k, v in sec["unavailable"].items()] + [""]
    notes: dict[str, list[str]] = {}
    for r in sec.get("rows", {}).values():
        for n in r.get("notes") or []:
            notes.setdefault(r["family"], [])
            if n not in notes[r["family"]]:
                notes[r["family"]].append(n)
    if notes:
        lines += ["What the peers needed (traps hit, as each peer module recorded them):", ""]
        for fam, ns in notes.items():
            lines += [f"- **{fam}**"] + [f"  - {n.rstrip('.')}." for n in ns]
        lines.append("")
    return lines


def render_reference(data: dict, img_dir: Path, rel: str, plot_name: str = "bench-quality-per-timestep.png") -> str:
    """The `reference` model's tables, findings and plot (or another unconditional model's)."""
    m = data.get("meta", {})
    commands, machine = _commands_and_machine(m)
    lines = [
        *commands,
        f"Model `{m.get('model')}` (sha256 {str(m.get('model_sha256'))[:12]}). Calibration budget for every method: "
        f"{m.get('calib_samples')} seeds x {m.get('calib_steps')} DDIM steps = {m.get('calib_forward_passes')} FP "
        f"forward passes (computed once, {fmt(m.get('calib_trajectories_s'), '.0f')} s, not counted in the calibration "
        f"times). Evaluation: {m.get('eval_samples')} held-out seeds (seed {m.get('heldout_seed')}), DDIM "
        f"{m.get('eval_steps')} steps. Scope for all: per-tensor inputs of Conv2d/Linear, per-channel weights, "
        "conv_out / time embedding / time_emb_proj FP; conv_in FP or quantized as the column says.", "",
        *machine,
    ]
    old = [r for r in data.get("rows", {}).values() if not r.get("error") and "noise_rel_l2_median" not in r]
    if old:
        lines += [f"**{len(old)} rows were recorded before the per-sample figures and the current sampler** (their "
                  "per-sample columns read n/a; \"Reading these numbers\" below says what changed since and where the "
                  "current figures of our methods are). Rerun with `--fresh` to refresh them.", ""]
    for finding in findings(data):
        lines.append(f"- {finding}")
    lines.append("")
    bucket_names = [f"{lo}-{hi}" for lo, hi in m.get("buckets", BUCKETS)]
    for bits in BITS:
        rows = [r for r in _sorted_rows(data.get("rows", {})) if r["bits"] == bits]
        if not rows:
            continue
        lines += [f"### {bits}", "",
                  "| method | scope | conv_in | rel-L2 per-sample median | p90 | max | pooled | " +
                  " | ".join(f"t {b}" for b in bucket_names) +
                  " | PSNR vs FP (dB) | chunk std | PSNR per-sample median | FD change | calib s |",
                  "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(bucket_names) + "---:|---:|---:|---:|---:|"]
        for r in rows:
            ci = "FP" if r["conv_in_fp"] else "quant"
            sc = r.get("own_scope") or "shared"
            if r.get("error"):
                lines.append(f"| {_label(r)} | {sc} | {ci} | failed: {r['error']} |" + " |" * (len(bucket_names) + 8))
                continue
            b = r["noise_rel_l2_buckets"]
            lines.append(
                f"| {_label(r)} | {sc} | {ci} | {fmt(r.get('noise_rel_l2_median'), '.4f')} | {fmt(r.get('noise_rel_l2_p90'), '.4f')} | "
                f"{fmt(r.get('noise_rel_l2_max'), '.4f')} | {r['noise_rel_l2']:.4f} | " + " | ".join(fmt(b.get(k), ".4f") for k in bucket_names) +
                f" | {r['psnr_vs_fp_db']:.2f} | {r['psnr_chunk_std_db']:.2f} | {r['psnr_per_sample_median_db']:.2f} | "
                f"{fmt(r['fd_delta_pct'], '+.1f')}% | {r['calibration_s']:.0f} |"
            )
        lines.append("")
    name = plot(data, img_dir, plot_name)
    if name:
        lines += [f"![noise-prediction error per timestep]({rel}/{name})", ""]
    lines += _peer_notes(data)
    return "\n".join(lines)


def text_findings(sec: dict) -> list[str]:
    """Per bit width: adpdm-G4 against the best peer on the shared scope, per sample (noise error median
    and max, worst-seed PSNR, prompt fidelity and agreement with FP)."""
    out = []
    rows = [r for r in sec.get("rows", {}).values() if not r.get("error") and r["conv_in_fp"]]
    for bits in BITS:
        same = [r for r in rows if r["bits"] == bits]
        ours = next((r for r in same if r["family"] == "ours" and r["variant"] == "adpdm-G4"), None)
        peers = [r for r in same if r["family"] != "ours" and not r.get("own_scope")]
        if not ours or not peers:
            continue
        best = min(peers, key=lambda r: r["noise_rel_l2_median"])
        out.append(
            f"{bits}: adpdm-G4 noise rel-L2 per sample median {ours['noise_rel_l2_median']:.4f} / max "
            f"{ours['noise_rel_l2_max']:.4f} vs the best peer on the same scope, {_label(best)}, "
            f"{best['noise_rel_l2_median']:.4f} / {best['noise_rel_l2_max']:.4f}; worst-seed PSNR vs FP "
            f"{ours['psnr_vs_fp_db_min']:.2f} vs {best['psnr_vs_fp_db_min']:.2f} dB; prompt fidelity "
            f"{fmt(ours.get('prompt_fidelity'))} vs {fmt(best.get('prompt_fidelity'))} (FP {fmt(ours.get('prompt_fidelity_fp'))}), "
            f"agreement with FP {fmt(ours.get('prompt_agreement'))} vs {fmt(best.get('prompt_agreement'))}."
        )
    return out


def render_text_model(name: str, sec: dict) -> str:
    """A text-to-image model's tables (the metrics of `adpdm eval`, per sample), one per bit width."""
    m = sec.get("meta", {})
    commands, machine = _commands_and_machine(m)
    lines = [
        f"### {name}: the text-to-image path (guidance {fmt(m.get('guidance_scale'), 'g')})", "",
        *commands,
        f"Model `{m.get('model')}` (sha256 {str(m.get('model_sha256'))[:12]}). Calibration for every method: the "
        f"trajectories of `adpdm calibrate {m.get('model')} --guidance-scale {fmt(m.get('guidance_scale'), 'g')}` "
        f"({m.get('calib_samples')} seeds x {m.get('calib_steps')} DDIM steps, the shipped prompts in turn"
        + (f", negative prompt \"\"; {m.get('calib_items_per_step')} UNet items per step, both guidance halves with "
           "their encoder_hidden_states" if (m.get("guidance_scale") or 1) > 1 else "; unguided: one UNet item per seed")
        + f": {m.get('calib_forward_passes')} items). Evaluation as `adpdm eval`: {m.get('eval_samples')} held-out seeds "
        f"(from {m.get('heldout_seed')}), the same prompts in turn and the same guidance, DDIM {m.get('eval_steps')}, "
        "decoded by the VAE; prompt fidelity = the digits classifier reads the asked digit; agreement = the "
        "same digit as the FP sample from the same noise. Scope: per-tensor inputs of Conv2d/Linear, per-channel "
        "weights, conv_in / conv_out / time embedding FP (our default)."
        + (f" Note: {m['text_note']}." if m.get("text_note") else ""), "",
        *machine,
    ]
    lines += [f"- {f}" for f in text_findings(sec)]
    lines.append("")
    for bits in BITS:
        rows = [r for r in _sorted_rows(sec.get("rows", {})) if r["bits"] == bits]
        if not rows:
            continue
        lines += [f"#### {name}, {bits}", "",
                  "| method | scope | conv_in | prompt fidelity (FP) | agreement with FP | p(asked) median / p10 | "
                  "PSNR vs FP per sample: median / min (dB) | FD (FP) | noise rel-L2 per sample: median / max | calib s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ci = "FP" if r["conv_in_fp"] else "quant"
            sc = r.get("own_scope") or "shared"
            if r.get("error"):
                lines.append(f"| {_label(r)} | {sc} | {ci} | failed: {r['error']} |" + " |" * 6)
                continue
            lines.append(
                f"| {_label(r)} | {sc} | {ci} | {fmt(r.get('prompt_fidelity'))} ({fmt(r.get('prompt_fidelity_fp'))}) | "
                f"{fmt(r.get('prompt_agreement'))} | {fmt(r.get('prompt_prob_median'))} / {fmt(r.get('prompt_prob_p10'))} | "
                f"{r['psnr_vs_fp_db_median']:.2f} / {r['psnr_vs_fp_db_min']:.2f} | {fmt(r.get('fd'), '.1f')} "
                f"({fmt(r.get('fd_fp'), '.1f')}) | {r['noise_rel_l2_median']:.4f} / {r['noise_rel_l2_max']:.4f} | "
                f"{r['calibration_s']:.0f} |"
            )
        lines.append("")
    lines += _peer_notes(sec)
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget, W8A8, conv_in FP, one variant per peer")
    p.add_argument("--model", default="reference", help="reference, or reference-text (the text-to-image path)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="text-to-image pipelines: guidance of calibration and evaluation (default: the model's own)")
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--ours", default=",".join(OURS), help="our methods (tools/eval_quality.py variant names; "
                   "<name>@ort: the CPU target, Conv/MatMul outputs quantized too)")
    p.add_argument("--peers", default="", help="only these peers (comma separated NAMEs, or NAME:VARIANT for one "
                   "variant); default: all")
    p.add_argument("--no-peers", action="store_true", help="ours only")
    p.add_argument("--conv-in", default="fp,quant", help="fp, quant or both (conv_in's input FP / quantized)")
    add_setup_arguments(p)
    p.add_argument("--json", default=None, help="results (default docs/bench_quality.json; quick: runs/bench-quality-quick.json)")
    p.add_argument("--force", action="store_true", help="recompute rows already in --json")
    p.add_argument("--fresh", action="store_true", help="start the model's rows in --json afresh instead of adding to them")
    p.add_argument("--md", default=None, help="the page to redraw (default docs/benchmarks.md; quick: runs/benchmarks-quick.md)")
    p.add_argument("--no-docs", action="store_true", help="do not redraw the page")
    p.add_argument("--report", action="store_true", help="only redraw docs/benchmarks.md from the JSON")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    args.bits = [b.upper() for b in args.bits.split(",") if b]
    args.ours = [m for m in args.ours.split(",") if m]
    args.peers = [m for m in args.peers.split(",") if m]
    args.conv_in = [{"fp": True, "quant": False}[c] for c in args.conv_in.split(",") if c]
    args.adpdm_options = dict(kv.partition("=")[::2] for kv in args.adpdm_option)
    if args.quick:
        q = QUICK
        args.calib_samples, args.calib_steps = q["calib_samples"], q["calib_steps"]
        args.samples, args.eval_steps = q["samples"], q["eval_steps"]
        args.bits, args.conv_in, args.ours = q["bits"], q["conv_in"], q["ours"]
        args.adpdm_options = {**q["adpdm_options"], **args.adpdm_options}
    if args.json is None:
        args.json = str(ROOT / ("runs/bench-quality-quick.json" if args.quick else "docs/bench_quality.json"))
    if args.md is None:
        args.md = str(ROOT / ("runs/benchmarks-quick.md" if args.quick else "docs/benchmarks.md"))
    from eval_quality import parse_variant

    for m in args.ours:
        base, _, target = m.partition("@")
        parse_variant(base)
        if target not in ("", "ort"):
            raise SystemExit(f"unknown graph target @{target} in {m} (only @ort)")
    for b in args.bits:
        parse_bits(b)
    if not args.report:
        run(args)
    if not args.no_docs:
        from bench_report import page_paths, write_benchmarks_md

        log(f"wrote {write_benchmarks_md(**page_paths(Path(args.md), quality_json=Path(args.json)))}")


if __name__ == "__main__":
    main()
