#!/usr/bin/env python
"""Numbers for docs/export.md: QDQ export of a model, parity per group and graph target, errors vs FP,
onnxruntime fusion counts and CPU latency of FP32 / TensorRT-target / CPU-target graphs.

    python tools/export_report.py reference --method uniform-groups --groups 4 --out /tmp/qdq-ref \
        --json docs/export_report.json --markdown /tmp/qdq-ref/report.md

MODEL is anything `adpdm` accepts ('reference', a diffusers folder) or `tiny-unet2d` /
`tiny-cond-unet` (the random test configs). The calibration is `--calibration DIR` (a
saved CalibrationResult) or made here with `--method` (small settings, cached trajectories).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def load(model: str):
    from adpdm_export.model_loading import load_model

    if model in ("tiny-unet2d", "tiny-cond-unet"):
        import tempfile

        from tiny_models import save_unet_folder, tiny_cond_unet, tiny_unet2d

        unet = tiny_unet2d() if model == "tiny-unet2d" else tiny_cond_unet()
        folder = Path(tempfile.mkdtemp(prefix="adpdm-report-")) / "unet"
        return load_model(str(save_unet_folder(unet, folder)))
    return load_model(model)


def latency_ms(path: Path, inputs: dict, threads: int, reps: int) -> float:
    from engines.ort_backend import OrtNoisePredictor, make_session

    pred = OrtNoisePredictor(make_session(path, providers=["CPUExecutionProvider"], threads=threads, optimize=True))
    vals = list(inputs.values())
    cond = dict(zip(list(inputs)[2:], vals[2:]))
    for _ in range(2):
        pred(vals[0], vals[1], **cond)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        pred(vals[0], vals[1], **cond)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calibration", type=Path)
    ap.add_argument("--method", default="uniform-groups")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="calibration trajectories (with --method)")
    ap.add_argument("--steps", type=int, default=20, help="calibration DDIM steps (with --method)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", "--profile", dest="target", default="both", help="graph targets: trt, ort or both (--profile: old name)")
    ap.add_argument("--parity-seeds", type=int, default=5, help="parity repeated over this many input seeds")
    ap.add_argument("--batch", type=int, default=8, help="batch for latency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)

    torch.set_num_threads(1)
    from adpdm_export.onnx_export import example_inputs, export_onnx
    from adpdm_export.ort_target import fusion_counts
    from adpdm_export.qdq_export import export_qdq_for
    from adpdm_export.qdq_parity import check_group_graph
    from calibration.quant_unet import quantize_model
    from calibration.result import CalibrationResult

    loaded = load(a.model)
    t0 = time.perf_counter()
    if a.calibration:
        result = CalibrationResult.load(a.calibration, expected_model_sha256=loaded.sha256)
    else:
        from calibration.configs import DataFreeConfig, method_config
        from calibration.pipeline import calibrate
        from calibration.qconfig import QuantConfig

        result = calibrate(
            loaded.unet, loaded.scheduler_config, method_config(a.method, {"groups": a.groups}),
            QuantConfig(w_bits=a.w_bits), data=DataFreeConfig(samples=a.samples, steps=a.steps),
            cache_dir=str(a.out / "cache"),
            cond=loaded.default_condition(1) or None,  # null prompt embedding / labels 0.. when conditional
        )
        result.save(a.out / "calibration")
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    exp = export_qdq_for(loaded, result, a.out, target=a.target, say=lambda m: print(m, file=sys.stderr))
    t_exp = time.perf_counter() - t0

    # parity over more inputs: free-running and teacher-forced, per group and graph target
    qmodel = quantize_model(loaded.unet, result=result)
    rows = []
    for tgt, graphs in exp.graphs.items():
        for k, g in enumerate(graphs):
            cs = [
                check_group_graph(g, qmodel, loaded.unet, result, k, tgt, loaded.sample_shape, loaded.conditioning,
                                  seed=s, optimized=(tgt == "ort"))
                for s in range(a.parity_seeds)
            ]
            rows.append({  # "profile": the graph target; the JSON key keeps its historical name
                "profile": tgt, "group": k, "timestep_ranges": exp.timestep_ranges[k],
                "free_rel_l2_median": statistics.median(c.parity_rel_l2 for c in cs),
                "free_rel_l2_max": max(c.parity_rel_l2 for c in cs),
                "runs_with_ties": sum(c.verdict == "ties" for c in cs),
                "runs": len(cs),
                "forced_rel_l2_max": max(c.forced_rel_l2 for c in cs),
                "forced_worst_input_rel_l2_max": max(c.forced["forced_worst_input_rel_l2"] for c in cs),
                "verdicts": sorted({c.verdict for c in cs}),
                "fp_rel_l2_mean": statistics.mean(c.fp_rel_l2 for c in cs),
                "sim_fp_rel_l2_mean": statistics.mean(c.sim_fp_rel_l2 for c in cs),
                "optimized_rel_l2_mean": statistics.mean(c.optimized_rel_l2 for c in cs) if tgt == "ort" else None,
                "optimized_fp_rel_l2_mean": statistics.mean(c.optimized_fp_rel_l2 for c in cs) if tgt == "ort" else None,
            })

    # latency: FP32 graph vs group-0 graphs, onnxruntime CPU, all optimizations
    fp_path = a.out / "fp32" / "unet.onnx"
    export_onnx(loaded.unet, fp_path, example_inputs(loaded.sample_shape, loaded.conditioning))
    inputs = example_inputs(loaded.sample_shape, loaded.conditioning, batch=a.batch, seed=3,
                            num_train_timesteps=loaded.num_train_timesteps)
    lat = {"fp32": latency_ms(fp_path, inputs, a.threads, a.reps)}
    for tgt, graphs in exp.graphs.items():
        lat[tgt] = latency_ms(graphs[0], inputs, a.threads, a.reps)
    fusion = {tgt: fusion_counts(graphs[0]).to_dict() for tgt, graphs in exp.graphs.items()}
    if "trt" in exp.graphs:  # docs/design.md's ablation: output Q/DQ but int8 zero points
        import onnx

        from adpdm_export.ort_target import add_output_qdq

        m = onnx.load(str(exp.graphs["trt"][0]), load_external_data=False)
        add_output_qdq(m, lambda q: float(result.activation_scales[q][0]))
        tmp = exp.graphs["trt"][0].with_name(".int8-output-qdq.onnx")
        tmp.write_bytes(m.SerializeToString())
        try:
            fusion["trt+output-qdq (int8 zero points)"] = fusion_counts(tmp).to_dict()
        finally:
            tmp.unlink()
    params = sum(p.numel() for p in loaded.unet.parameters())

    report = {
        "model": a.model, "type": loaded.kind, "params": params, "sample_shape": list(loaded.sample_shape),
        "calibration": {"method": result.method, "groups": result.num_groups, "w_bits": result.w_bits,
                        "a_bits": result.a_bits, "from": str(a.calibration) if a.calibration else "made here",
                        "seconds": round(t_cal, 1)},
        "export_seconds": round(t_exp, 1),
        "files": {p: [g.name for g in gs] for p, gs in exp.graphs.items()},
        "weights_bytes": exp.weights.stat().st_size,
        "graph_bytes": {p: gs[0].stat().st_size for p, gs in exp.graphs.items()},
        "folded_weights": exp.folded_weights,
        "parity": rows,
        "fusion": fusion,
        "latency_ms": {k: round(v, 2) for k, v in lat.items()},
        "latency_setup": {"batch": a.batch, "threads": a.threads, "reps": a.reps, "machine": platform.processor() or platform.machine(),
                          "onnxruntime": __import__("onnxruntime").__version__},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"Model `{r['model']}` ({r['type']}, {r['params'] / 1e6:.2f} M parameters), calibration {r['calibration']['method']} "
        f"W{r['calibration']['w_bits']}A{r['calibration']['a_bits']}, {r['calibration']['groups']} groups.",
        "",
        "| target | group | timesteps | free-running rel L2 (median / max) | runs with a tie | teacher-forced rel L2 (max) | vs FP (mean) | CPU-optimized vs sim / vs FP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["parity"]:
        rng = ", ".join(f"{a}-{b}" for a, b in p["timestep_ranges"])
        opt = "-" if p["optimized_rel_l2_mean"] is None else f"{p['optimized_rel_l2_mean']:.2e} / {p['optimized_fp_rel_l2_mean']:.3f}"
        lines.append(
            f"| {p['profile']} | {p['group']} | {rng} | {p['free_rel_l2_median']:.1e} / {p['free_rel_l2_max']:.1e} | "
            f"{p['runs_with_ties']}/{p['runs']} | {max(p['forced_rel_l2_max'], p['forced_worst_input_rel_l2_max']):.1e} | "
            f"{p['fp_rel_l2_mean']:.4f} | {opt} |"
        )
    lines += ["", "| graphs | quantized ops | fused by onnxruntime | ratio |", "|---|---|---|---|"]
    for tgt, f in r["fusion"].items():
        q = ", ".join(f"{k} {v}" for k, v in sorted(f["quantized"].items()))
        fu = ", ".join(f"{k} {v}" for k, v in sorted(f["fused"].items())) or "none"
        lines.append(f"| {tgt} | {q} | {fu} | {f['fused_total']}/{f['total']} ({f['ratio']:.0%}) |")
    lat = r["latency_ms"]
    s = r["latency_setup"]
    lines += ["", f"onnxruntime CPU latency, batch {s['batch']}, {s['threads']} threads, median of {s['reps']}: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in lat.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
