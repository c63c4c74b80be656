"""Peak resident memory and time of every stage of `build-engine`, on the reference model or a
random-weight layout (tools/bench_speed/models.py LAYOUTS: sd15, sd15-w64, ddpm-cifar10, ...).

    .venv/bin/python tools/stage_memory.py --model sd15-w64 --samples 2 --steps 4 --json /tmp/mem.json

A thread samples this process's RSS (/proc/self/status) every 0.1 s; the stage label is the last
progress stage (calibration: trajectories, weights, srm, data, init, search, refine) or export step
("export: tracing", "export: converting to fp16", "export: writing trt graphs", "export: linting",
"export: parity unet.g0.onnx", "export: fusions", "export: one session") the build reported. Printed and
written: per label the peak RSS and the seconds spent, the process's high-water mark, and the
build's own stage times. docs/benchmarks.md ("Memory and time of build-engine by stage") records the
runs (their JSON in docs/stage_memory/; `--table A.json B.json` prints that table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class StageMemory:
    """Peak RSS and time per stage label, sampled from a background thread."""

    def __init__(self, interval: float = 0.1, on_mark: Optional[Callable[["StageMemory"], None]] = None):
        self.on_mark = on_mark  # called after every new stage (the partial record: a killed run leaves it)
        self.label = "load"
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.order: list[str] = []
        self._since = time.perf_counter()
        self._stop = threading.Event()
        self._interval = interval
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.mark("load")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.mark("done")
        self._stop.set()
        self._thread.join()

    def mark(self, label: str) -> None:
        with self._lock:
            now = time.perf_counter()
            self.seconds[self.label] = self.seconds.get(self.label, 0.0) + now - self._since
            self._since = now
            self.label = label
            if label not in self.order:
                self.order.append(label)
            self._sample()
        if self.on_mark is not None:
            self.on_mark(self)

    def stages(self) -> list[dict]:
        with self._lock:
            return [{"label": k, "peak_rss_mib": round(self.peaks.get(k, 0.0), 1),
                     "seconds": round(self.seconds.get(k, 0.0), 1)} for k in self.order if k != "done"]

    def _sample(self) -> None:
        r = rss_mib()
        self.peaks[self.label] = max(self.peaks.get(self.label, 0.0), r)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                self._sample()

    def progress(self, stage: str, done: int, total: int, loss=None) -> None:
        if stage != self.label:
            self.mark(stage)

    def say(self, line: str) -> None:
        """build_engine's lines: "<stage>: running|done|reused ..." and the export's own steps."""
        print(f"  {line}", file=sys.stderr, flush=True)
        if line.startswith("calibration estimate"):
            return
        stage, _, rest = line.partition(": ")
        word = rest.split(" ")[0] if rest else ""
        if stage in ("calibrate", "export", "engines") and word == "running":
            self.mark(stage)
        elif stage in ("calibrate", "export", "engines") and word in ("done", "reused"):
            self.mark(f"after {stage}")
        elif stage == "export":  # an export step ("export: tracing the quantized UNet ...", "export: parity: ...")
            self.mark("export: " + export_step(rest))
        else:
            self.mark(" ".join(line.split()[:2]).rstrip(":"))


EXPORT_STEPS = (  # the start of an export line -> its label (qdq_export.export_qdq's say lines)
    ("tracing", "tracing"), ("converting", "converting to {5}"), ("writing", "writing {2} graphs"),
    ("linting", "linting"), ("parity of", "parity skipped"), ("parity:", "parity {1}"), ("counting", "fusions"),
    ("the CPU-target groups as one", "one session"), ("warning", "warning"),
)


def export_step(rest: str) -> str:
    """A short label for one export line: "parity: unet.g0.onnx vs the trt ..." -> "parity unet.g0.onnx"."""
    words = rest.split() + [""] * 8
    for start, label in EXPORT_STEPS:
        if rest.startswith(start):
            return label.format(*(w.rstrip(":") for w in words))
    return " ".join(rest.split()[:2]).rstrip(":")


def load_model_for(name: str, sample_size, width_div: int):
    """tools/bench_speed's model, optionally with another sample size or narrower blocks (random weights)."""
    from tools.bench_speed import models

    if sample_size is None and width_div == 1:
        return models.load_bench_model(name)
    layout = dict(models.LAYOUTS[name])
    if sample_size is not None:
        layout["sample_size"] = int(sample_size)
    if width_div != 1:
        layout["block_out_channels"] = tuple(c // width_div for c in layout["block_out_channels"])
    key = f"{name}-s{layout['sample_size']}-w{width_div}"
    models.LAYOUTS[key] = layout
    return models.load_bench_model(key)


def add_method_args(p: argparse.ArgumentParser, method: str = "adpdm") -> None:
    """--method, --groups, --option KEY=VALUE (read back by `method_from_args`)."""
    p.add_argument("--method", default=method)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--option", action="append", default=[], help="KEY=VALUE of the method config")


def method_from_args(args):
    """The method config of `add_method_args`'s flags (--groups for the methods that have groups)."""
    from calibration.configs import method_config

    values = dict(kv.split("=", 1) for kv in args.option)
    if args.method in ("adpdm", "uniform-groups"):
        values.setdefault("groups", args.groups)
    return method_config(args.method, values)


def export_only(loaded, out_dir: Path, method, data, targets, mem: StageMemory) -> list[dict]:
    """build-engine's calibrate and export stages without its engine stage (the commands `adpdm calibrate`
    and `adpdm export` run), for TensorRT-target graphs on a machine without TensorRT."""
    from adpdm_export.qdq_export import export_qdq_for
    from calibration.pipeline import calibrate
    from engines.heap import release_heap

    stages = []
    t0 = time.perf_counter()
    mem.say("calibrate: running")
    result = calibrate(loaded.unet, loaded.scheduler_config, method, data=data, progress=mem.progress,
                       cond=loaded.default_condition(data.samples))
    release_heap()
    mem.say(f"calibrate: done ({result.method}, {result.num_groups} group(s))")
    stages.append({"name": "calibrate", "seconds": round(time.perf_counter() - t0, 1)})
    t0 = time.perf_counter()
    mem.say("export: running")
    export_qdq_for(loaded, result, out_dir, target=targets, say=lambda msg: mem.say(f"export: {msg}"))
    release_heap()
    mem.say("export: done")
    stages.append({"name": "export", "seconds": round(time.perf_counter() - t0, 1)})
    return stages


def markdown_table(paths: list[str]) -> str:
    """One markdown table of peak RSS (MiB) and seconds per stage label from several runs' JSON (the
    columns in the order given, the rows in the last run's order; a label a run did not report reads "-")."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    labels: list[str] = []
    for r in reversed(runs):  # the newest run's order first
        for st in r["stages"]:
            if st["label"] not in labels:
                labels.append(st["label"])
    head = "| stage | " + " | ".join(f"{Path(p).stem}: peak MiB / s" for p in paths) + " |"
    rows = [head, "|---|" + "---:|" * len(runs)]
    for label in labels:
        cells = []
        for r in runs:
            st = next((x for x in r["stages"] if x["label"] == label), None)
            cells.append(f"{st['peak_rss_mib']:.0f} / {st['seconds']:.1f}" if st else "-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    def hwm(r: dict) -> str:
        x = f" ({r['peak_rss_mib'] / (r['params_m'] * 4e6 / 2**20):.1f}x the FP32 weights)" if r.get("params_m") else ""
        return f"**{r['peak_rss_mib']:.0f}**{x}"

    rows.append("| **process high-water mark (VmHWM)** | " + " | ".join(hwm(r) for r in runs) + " |")
    rows.append("| wall time (s) | " + " | ".join(f"{r['wall_s']:.0f}" for r in runs) + " |")
    if any(r.get("status", "done") != "done" for r in runs):  # a partial record: the run was killed
        rows.append("| status | " + " | ".join(r.get("status", "done").replace("running", "killed") for r in runs) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--table":  # python tools/stage_memory.py --table RUN.json ...: the docs' table
        print(markdown_table(argv[1:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference")
    add_method_args(p)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--targets", default="ort,trt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sample-size", type=int, default=None, help="override the layout's sample size (activations)")
    p.add_argument("--width-div", type=int, default=1, help="divide the layout's block widths (weights)")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", default=None, help="build into this folder (kept) instead of a temporary one")
    args = p.parse_args(argv)

    import torch

    from adpdm_export.build_pipeline import build_engine
    from calibration.configs import DataFreeConfig
    from tools.bench_speed.models import params_m

    torch.set_num_threads(args.threads)
    method = method_from_args(args)
    data = DataFreeConfig(samples=args.samples, steps=args.steps)
    t0 = time.perf_counter()
    command = "python tools/stage_memory.py " + " ".join(argv)
    head = {"model": args.model, "method": method.to_dict(), "data": data.to_dict(), "targets": args.targets,
            "threads": args.threads, "command": command}

    def partial(m: StageMemory) -> None:  # rewritten at every stage: what a run killed for memory leaves
        if args.json:
            Path(args.json).write_text(json.dumps({**head, "status": f"running (last stage: {m.label})",
                                                   "peak_rss_mib": round(rss_mib("VmHWM"), 1), "stages": m.stages(),
                                                   "wall_s": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")

    with StageMemory(on_mark=partial) as mem, tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp) / "out"
        loaded = load_model_for(args.model, args.sample_size, args.width_div)
        head["params_m"] = params_m(loaded.unet)
        mem.mark("build")
        targets = tuple(args.targets.split(","))
        if "ort" in targets:
            summary = build_engine(loaded, out_dir, method, data=data, backend="ort", targets=targets, cache_dir=None,
                                   progress=mem.progress, say=mem.say)
            build_stages = [{"name": s.name, "seconds": round(s.seconds, 1)} for s in summary.stages]
        else:  # TensorRT graphs only, where no TensorRT is: `adpdm calibrate`, then `adpdm export --target trt`
            build_stages = export_only(loaded, out_dir, method, data, targets, mem)
        files = {f.name: f.stat().st_size for f in out_dir.iterdir() if f.is_file()}
    wall = time.perf_counter() - t0
    out = {
        "model": args.model, "params_m": params_m(loaded.unet), "method": method.to_dict(), "data": data.to_dict(),
        "targets": args.targets, "threads": args.threads, "status": "done", "wall_s": round(wall, 1),
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "stages": mem.stages(),
        "build_stages": build_stages,
        "files_mib": {k: round(v / 2**20, 2) for k, v in sorted(files.items())},
        "command": command,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
