"""The "## Speed" section of docs/benchmarks.md (tools/bench_report.py calls `render_markdown`) and
the latency plot, from the JSON alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .models import DIAGNOSTIC
from .targets import TARGETS

PLOT_NAME = "bench-speed-latency.png"


def _fmt(v, spec: str = ".2f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _plot(data: dict, path: Path) -> Optional[Path]:
    rows = [r for r in (data.get("latency") or {}).get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            pts = sorted((r["batch"], r["median_ms"]) for r in rows if r["model"] == model and r["variant"] == variant)
            style = "--" if variant in DIAGNOSTIC else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=variant,
                    linewidth=2.5 if variant == "ours" else 1.2)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("median ms per UNet call")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    threads = (data.get("machine") or {}).get("threads")
    fig.suptitle(f"UNet forward latency, {threads} threads (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_markdown(data: dict, img_dir: Path, rel_img_prefix: str) -> str:
    """The "## Speed" section of docs/benchmarks.md (and the latency PNG in img_dir)."""
    L: list[str] = ["## Speed", ""]
    m = data.get("machine") or {}
    if data.get("quick"):
        L += ["**Quick run** (`--quick`: small settings, a smoke test; not the benchmark).", ""]
    lat = data.get("latency") or {}
    st = lat.get("settings") or {}
    L += [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; {m.get('threads')} threads "
        f"(torch.set_num_threads, onnxruntime intra-op {m.get('threads')} / inter-op 1"
        f"{', spinning off' if not st.get('ort_spinning') else ''}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v) + ".",
        "",
        f"Last command: `{data.get('command')}` ({data.get('date')}, {_fmt(data.get('wall_s'), '.0f')} s). "
        "Each part below comes from the command that last ran it:",
        "",
        *[f"- {part}: `{(data.get(part) or {}).get('command')}`" for part in
          ("latency", "dispatch", "rss", "calibration", "build_engine") if (data.get(part) or {}).get("command")],
        "",
        "Random weights are fine for speed: the kernels' cost does not depend on the weight values, and every "
        "quantizer's scales come from a small calibration budget "
        f"({st.get('calib_budget', 'n/a')}), which changes no kernel. All latencies of one model come from one "
        f"process, interleaved round-robin ({st.get('rounds')} rounds x {st.get('iters')} calls per variant, the "
        f"start rotating each round, {st.get('warmup')} warm-up call(s) excluded); the calls walk the "
        "timesteps of a DDIM 50-step loop in order (so ours switches groups as often as sampling does), the same "
        "inputs for every variant.",
        "",
    ]
    targets = data.get("targets") or []
    if targets:
        L += ["### Targets", "", "| target | model | measured | met |", "|---|---|---:|---|"]
        for t in targets:
            met = {True: "**yes**", False: "**no**", None: "not measured"}[t.get("met")]
            val = "n/a" if t.get("value") is None else f"{t['value']:g} {t.get('unit', '')}".strip()
            if t.get("why"):
                val += f" ({t['why']})"
            L.append(f"| {t['target']} | {t.get('model')} | {val} | {met} |")
        L.append("")
        L += [_targets_in_words(targets), ""]
    rows = lat.get("rows") or []
    if rows:
        L += ["### Latency", ""]
        models = lat.get("models") or {}
        for model in dict.fromkeys(r["model"] for r in rows):
            info = models.get(model, {})
            L += [f"**{model}** ({info.get('params_m')}M parameters, input {info.get('sample_shape')}, "
                  f"{info.get('weights')} weights)", "",
                  "| batch | variant | median ms | min ms | vs onnxruntime FP32 | runs |", "|---:|---|---:|---:|---:|---:|"]
            for r in (r for r in rows if r["model"] == model):
                if r.get("status") == "ok":
                    sp = r.get("speedup_vs_ort_fp32")
                    L.append(f"| {r['batch']} | {r['label']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                             f"{_fmt(sp, '.2f')}{'x' if sp else ''} | {len(r['times_ms'])} |")
                else:
                    L.append(f"| {r['batch']} | {r['label']} | {r.get('status')}: {r.get('reason', '')} | | | |")
            L.append("")
            var = (lat.get("variants") or {}).get(model, {})
            notes = []
            for v, i in var.items():
                bits = []
                if i.get("peer_variant"):
                    bits.append(f"peer variant {i['peer_variant']}")
                if i.get("fused"):
                    bits.append(f"onnxruntime fuses {i['fused']} quantized ops")
                if i.get("calibration_s") is not None:
                    bits.append(f"calibration {i['calibration_s']} s")
                bits += [n if len(n) <= 240 else n[:240] + "... (full text in the JSON)" for n in i.get("notes") or []]
                if bits:
                    notes.append(f"- {v}: " + "; ".join(bits))
            if notes:
                L += notes + [""]
        png = _plot(data, Path(img_dir) / PLOT_NAME)
        if png:
            L += [f"![latency by batch per variant]({rel_img_prefix}/{PLOT_NAME})", ""]
    disp = (data.get("dispatch") or {}).get("rows") or []
    if disp:
        L += ["### Runner dispatch overhead", "",
              "The runner vs a bare `session.run` of the same group session (same inputs, interleaved), and the "
              f"runner's own cost alone: its session swapped for one returning a precomputed output "
              f"(median of {(data.get('dispatch') or {}).get('null_reps')} calls).", "",
              "| model | batch | runner ms | bare session ms | difference | runner's own cost | % of a step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for r in disp:
            if r.get("status") != "ok":
                L.append(f"| {r['model']} | | {r.get('status')}: {r.get('reason')} | | | | |")
                continue
            L.append(f"| {r['model']} | {r['batch']} | {r['runner_median_ms']:.3f} | {r['bare_median_ms']:.3f} | "
                     f"{r['difference_ms']:+.3f} ms ({r['difference_pct']:+.1f}%) | {r['overhead_ms'] * 1e3:.0f} us | "
                     f"{r['overhead_pct']:.3f}% |")
        L += ["", "The target is judged on the runner's own cost. The in-situ difference of two medians is noisy (it "
              "can be negative) but is what a user sees: on a small model it can exceed the runner's own cost, "
              "because the runner's small torch operations (input checks, torch.unique / nonzero) just before "
              "onnxruntime's run slow that run down on a loaded 2-core machine.", ""]
    rss = data.get("rss") or {}
    if isinstance(rss.get("summary"), list) and (rss.get("summary") or rss.get("runs")):
        L += ["### Resident memory of the runner, G = 1 vs G = 4", "",
              f"{rss.get('model')}: real builds of ours (CPU target, {rss.get('weights_file_mib')} MiB weights file), "
              "each configuration in a fresh interpreter; MiB of RSS above the interpreter after importing torch, "
              "numpy, onnxruntime and the runner: after loading the G sessions, and steady (after one run of every "
              f"group and {rss.get('reps')} more). Latency here is single-process and noisy; the interleaved "
              "latency table has the `ours-noprepack` row.", "",
              "| batch | configuration | after load G=1 / G=4 | steady G=1 | steady G=4 | steady ratio | per extra "
              "group (load / steady) | median ms G=1 / G=4 |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for s in rss["summary"]:
            L.append(f"| {s['batch']} | {s['config']}: {s['note']} | {s['load_G1_mib']} / {s['load_G4_mib']} | "
                     f"{s['G1_mib']} | {s['G4_mib']} | {_fmt(s['ratio'])}x | +{s['load_per_extra_group_mib']} / "
                     f"+{s['per_extra_group_mib']} | {s['latency_ms_median_G1']} / {s['latency_ms_median_G4']} |")
        for r in rss.get("runs") or []:
            if r.get("status") != "ok":
                L.append(f"| {r.get('batch')} | {r['config']} G={r['G']}: failed | | | | | | |")
        L += ["", _rss_in_words(rss), ""]
    cal = data.get("calibration") or {}
    if cal.get("status") == "ok":
        t = cal.get("timings") or {}
        L += ["### ADP-DM calibration time", "",
              f"`calibrate(method=\"adpdm\", groups=4)` on {cal['model']} ({cal['params_m']}M parameters, "
              f"{cal['weights']} weights: a trained model is not needed for timing), {cal['calib_samples']} samples x "
              f"{cal['calib_steps']} DDIM steps, batch {cal['batch_size']}, {cal['threads']} threads, ADP-DM options "
              f"{cal['adpdm_options']}" + (f" (from `{cal['command']}`)" if cal.get("command") else "") + ".", "",
              "| stage | seconds |", "|---|---:|"]
        for k, v in t.items():
            L.append(f"| {k} | {v} |")
        L += [f"| **wall** | **{cal['wall_s']}** |", ""]
    elif cal:
        L += ["### ADP-DM calibration time", "", f"{cal.get('status')}: {cal.get('reason')}", ""]
    be = data.get("build_engine") or {}
    if be.get("status") == "ok":
        L += ["### `build-engine` wall time per stage (reference model)", "",
              f"`{be['cli_equivalent']}`: fresh out folder and trajectory cache, {be['threads']} threads, "
              f"graph targets {', '.join(be['profiles'])} (no TensorRT here: no engine stage).", "",
              "| stage | seconds |", "|---|---:|"]
        for s in be["stages"]:
            L.append(f"| {s['name']}{' (reused!)' if s['reused'] else ''} | {s['seconds']} |")
        for k, v in (be.get("calibration_timings") or {}).items():
            L.append(f"| calibrate / {k} | {v} |")
        for k, v in (be.get("export_timings") or {}).items():
            L.append(f"| export / {k} | {v} |")
        if be.get("outside_stages_s") is not None:
            L.append(f"| outside the stages (model load and hash, manifest) | {be['outside_stages_s']} |")
        L += [f"| **total** | **{be['wall_s']}** |", ""]
    elif be:
        L += ["### `build-engine` wall time per stage", "", f"{be.get('status')}: {be.get('reason')}", ""]
    return "\n".join(L) + "\n"


def _targets_in_words(targets: list[dict]) -> str:
    met = [t for t in targets if t.get("met") is True]
    missed = [t for t in targets if t.get("met") is False]
    unknown = [t for t in targets if t.get("met") is None]
    parts = [f"{len(met)} of {len(targets)} target rows met"]
    if missed:
        parts.append("missed: " + "; ".join(f"{t['target']} on {t.get('model')} ({t['value']:g} {t.get('unit', '')})"
                                            for t in missed))
    if unknown:
        parts.append("not measured: " + "; ".join(f"{t['target']}" + (f" ({t['why']})" if t.get("why") else "")
                                                  for t in unknown))
    return ". ".join(parts) + "."


def _rss_in_words(rss: dict) -> str:
    """What the RSS rows say: the per-group cost, and what pre-packing has to do with it."""
    words = []
    for batch in rss.get("batches") or []:
        rows = {s["config"]: s for s in rss.get("summary") or [] if s["batch"] == batch}
        d, off, shared = rows.get("default"), rows.get("prepacking-off"), rows.get("prepacking-off+shared-int8")
        if not d:
            continue
        words.append(f"Batch {batch}: as shipped, G = 4 takes {d['ratio']}x the steady memory of G = 1 "
                     f"({'meets' if d['ratio'] <= TARGETS['rss_ratio'] else 'misses'} the {TARGETS['rss_ratio']}x "
                     f"target); each extra group adds +{d['load_per_extra_group_mib']} MiB at load "
                     f"(weights file: {rss['weights_file_mib']} MiB). The one shared activation arena is in G = 1's "
                     "steady figure too, so the steady ratio falls as the batch grows.")
        if off:
            prepack = off["load_per_extra_group_mib"] < 0.5 * d["load_per_extra_group_mib"]
            words.append(f"Pre-packing off (`session.disable_prepacking`): +{off['load_per_extra_group_mib']} MiB per "
                         f"extra group at load, +{off['per_extra_group_mib']} MiB steady ({off['ratio']}x), "
                         f"{off['latency_ms_median_G4']} vs {d['latency_ms_median_G4']} ms per call: "
                         + ("so most of the per-group cost is onnxruntime's per-session pre-packed copy of the fused "
                            "INT8 weights (onnxruntime's Python API has no PrepackedWeightsContainer to share it); "
                            "without pre-packing the INT8 weights are still read once per session, and the kernels are "
                            "slower." if prepack else
                            "so the per-group cost is mostly per-session overhead other than pre-packed weights "
                            "(graph, kernels, buffers), not the weights."))
        if shared:
            words.append(f"Pre-packing off AND the INT8 weights handed to every session from the one memory map "
                         f"(a change to engines/ort_group_sessions.py, tried here in the child only): "
                         f"+{shared['per_extra_group_mib']} MiB per extra group ({shared['ratio']}x), at "
                         f"{shared['latency_ms_median_G4']} vs {d['latency_ms_median_G4']} ms per call.")
    return " ".join(words) or "The default configuration did not run."
