"""Resident memory of G onnxruntime group sessions: G=1 vs G=4, plain sessions vs engines.OrtGroupSessions.

Exports a diffusers UNet2DModel with random weights (default: the DDPM-CIFAR10 layout,
35.7M parameters, 32x32x3) to ONNX once (TorchScript exporter, opset 19, weights in one
external file), then writes G group graphs that are that graph plus `out += k` (identical
except one small constant, like real group graphs that differ only in activation scales)
and all reference the SAME external weights file. With --qdq it also makes an INT8 QDQ
version with onnxruntime's `quantize_static` (uint8 activations, per-channel int8 weights,
Q/DQ on inputs and outputs so Conv/MatMul fuse to QLinear ops, like the CPU target).

Each configuration runs in a fresh interpreter and reports (MiB, relative to the
interpreter before any session): after loading the G sessions (`load`), after one run of
every group (`steady`, activation arenas included), plus proportional set size and the
min/median latency of one forward pass (batch --batch). Modes:

  plain      G x InferenceSession(graph) with onnxruntime defaults (level "all", own arena,
             own copies of the weights) - what G calls of engines.ort_backend.make_session give
  group      engines.OrtGroupSessions defaults (level "extended", weights from one memory map
             via add_initializer, one shared arena, no spinning)
  group-all  OrtGroupSessions at level "all" (the NCHWc transform copies Conv weights per session)

Prints one JSON line per run and a final summary line (`{"summary": ...}`).

    .venv/bin/python tools/measure_ort_rss.py [--workdir DIR] [--qdq] [--small] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "group", "group-all")
# google/ddpm-cifar10-32 layout (35.7M parameters), random weights; tools/bench_speed uses it too
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pss_mib() -> float:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ------------------------------------------------------------------ child: one measurement


def child(args) -> None:
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from engines.ort_group_sessions import OrtGroupSessions  # imported by every mode: same baseline (torch)

    graphs = [Path(args.workdir) / args.sub / f"unet.g{k}.onnx" for k in range(args.groups)]
    r0, p0 = status_mib("VmRSS"), pss_mib()
    t0 = time.perf_counter()
    if args.mode == "plain":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if args.threads:
            so.intra_op_num_threads = args.threads
        sessions = [ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"]) for g in graphs]
        run = lambda k, feeds: sessions[k].run(["out_sample"], feeds)[0]  # noqa: E731
    else:
        opt = "all" if args.mode == "group-all" else "extended"
        gs = OrtGroupSessions(graphs, ["CPUExecutionProvider"], threads=args.threads, optimization=opt)
        run = gs.run
    load_s = time.perf_counter() - t0
    r_load = status_mib("VmRSS")
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((args.batch, *args.shape), dtype=np.float32),
        "timestep": np.full((args.batch,), 500, np.int64),
    }
    means = [float(run(k, feeds).mean()) for k in range(args.groups)]
    r_run = status_mib("VmRSS")
    times = []
    for i in range(args.reps):
        t = time.perf_counter()
        run(i % args.groups, feeds)  # alternate groups, as a mixed sampling run does
        times.append(time.perf_counter() - t)
    times.sort()
    print(
        json.dumps(
            {
                "graphs": args.sub,
                "mode": args.mode,
                "G": args.groups,
                "rss_base_mib": round(r0),
                "load_mib": round(r_load - r0),
                "steady_mib": round(status_mib("VmRSS") - r0),
                "after_first_runs_mib": round(r_run - r0),
                "pss_steady_mib": round(pss_mib() - p0),
                "peak_mib": round(status_mib("VmHWM") - r0),
                "load_s": round(load_s, 2),
                "latency_ms_min": round(times[0] * 1e3, 1),
                "latency_ms_median": round(times[len(times) // 2] * 1e3, 1),
                # group k adds k to the output: the means must step by 1
                "group_offsets_ok": all(abs((m - means[0]) - k) < 1e-3 for k, m in enumerate(means)),
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------ parent: graphs + runs


def _unet(small: bool):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if small:
        return UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        ).eval()
    return UNet2DModel(**DDPM_CIFAR10).eval()


def _save_groups(model_path: Path, out: Path, groups: int) -> None:
    """Group k = the graph + `out_sample += k`; all share out/unet.weights.data."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path))
    onnx.save_model(model, str(out / "base.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet.weights.data", size_threshold=0)
    for k in range(groups):
        m = onnx.load(str(out / "base.onnx"), load_external_data=False)
        for node in m.graph.node:
            node.output[:] = ["out_pre" if o == "out_sample" else o for o in node.output]
        m.graph.initializer.append(numpy_helper.from_array(np.array(float(k), np.float32), "group_offset"))
        m.graph.node.append(helper.make_node("Add", ["out_pre", "group_offset"], ["out_sample"], name="group_add"))
        onnx.save(m, str(out / f"unet.g{k}.onnx"))
    (out / "base.onnx").unlink()


def prepare(workdir: Path, small: bool, qdq: bool, groups: int) -> dict:
    import torch

    fp = workdir / "fp"
    raw = workdir / "fp_inline.onnx"  # the exported FP graph, weights inline (kept for --qdq)
    info_path = workdir / "info.json"
    if not raw.is_file() or not info_path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        unet = _unet(small)

        class Wrap(torch.nn.Module):
            def __init__(self, u):
                super().__init__()
                self.u = u

            def forward(self, x, t):
                return self.u(x, t).sample

        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Wrap(unet), (torch.randn(2, 3, 32, 32), torch.tensor([1, 500])), str(raw),
                input_names=["sample", "timestep"], output_names=["out_sample"],
                dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "out_sample": {0: "batch"}},
                opset_version=19, dynamo=False,
            )
        info_path.write_text(json.dumps({"params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)}))
    if not (fp / f"unet.g{groups - 1}.onnx").is_file():
        _save_groups(raw, fp, groups)
    if qdq and not (workdir / "qdq" / f"unet.g{groups - 1}.onnx").is_file():
        import numpy as np
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i >= 2:
                    return None
                self.i += 1
                r = np.random.default_rng(self.i)
                return {"sample": r.standard_normal((2, 3, 32, 32), dtype=np.float32), "timestep": np.array([10, 900])}

        qbase = workdir / "qdq_inline.onnx"
        quantize_static(str(raw), str(qbase), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        _save_groups(qbase, workdir / "qdq", groups)
        qbase.unlink()
    info = json.loads(info_path.read_text())
    info["weights_mib"] = {
        s: round((workdir / s / "unet.weights.data").stat().st_size / 2**20, 1)
        for s in ("fp", "qdq") if (workdir / s / "unet.weights.data").is_file()
    }
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/measure-ort-rss")
    ap.add_argument("--small", action="store_true", help="a smaller UNet (quick check)")
    ap.add_argument("--qdq", action="store_true", help="also measure an INT8 QDQ (CPU-target-like) version")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--graphs", default="", help="comma list of fp,qdq (default: fp, plus qdq with --qdq)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sub", default="fp", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--groups", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.shape = (3, 32, 32)
    if args.child:
        return child(args)
    workdir = Path(args.workdir)
    info = prepare(workdir, args.small, args.qdq, 4)
    results = []
    subs = args.graphs.split(",") if args.graphs else ["fp"] + (["qdq"] if args.qdq else [])
    for sub in subs:
        for mode in args.modes.split(","):
            for G in (1, 4):
                cmd = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--sub", sub, "--mode", mode,
                       "--groups", str(G), "--threads", str(args.threads), "--batch", str(args.batch), "--reps", str(args.reps)]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    sys.exit(f"measurement {sub}/{mode}/G={G} failed:\n{r.stderr[-3000:]}")
                line = r.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                results.append(json.loads(line))
    summary = {"model": info, "threads": args.threads, "batch": args.batch, "cpus": os.cpu_count()}
    for sub in {r["graphs"] for r in results}:
        for mode in {r["mode"] for r in results}:
            rs = {r["G"]: r for r in results if r["graphs"] == sub and r["mode"] == mode}
            if 1 in rs and 4 in rs:
                summary[f"{sub}/{mode}"] = {
                    "steady_G1_mib": rs[1]["steady_mib"],
                    "steady_G4_mib": rs[4]["steady_mib"],
                    "per_extra_group_mib": round((rs[4]["steady_mib"] - rs[1]["steady_mib"]) / 3, 1),
                    "latency_ms_min_G4": rs[4]["latency_ms_min"],
                }
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
