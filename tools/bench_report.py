"""docs/benchmarks.md from the benchmarks' JSON (docs/bench_quality.json, docs/bench_speed.json).

Both benchmarks call `write_benchmarks_md()` when they finish, so the page always shows the
latest full run of each; `python tools/bench_report.py` redraws it by hand. Each benchmark
renders its own section (`bench_quality.render_markdown`, `tools.bench_speed.report.render_markdown`);
this module adds the header, the machine and the commands.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
QUALITY_JSON = DOCS / "bench_quality.json"
SPEED_JSON = DOCS / "bench_speed.json"
BENCH_MD = DOCS / "benchmarks.md"
# what a person wrote after reading a full run (which run it is about is said in it); appended as is
READING_MD = DOCS / "benchmarks-reading.md"
IMG_DIR = DOCS / "img"
VERSIONED = ("torch", "onnxruntime", "onnx", "diffusers", "numpy", "nvidia-modelopt", "torchao", "optimum-quanto")


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores, memory and the versions that decide the numbers."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
    }


def machine_markdown(info: dict[str, Any]) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v)
    return (f"{info.get('cpu')}, {info.get('cores')} cores, {info.get('memory_gib')} GiB; "
            f"{info.get('threads')} threads; Python {info.get('python')}; {vers}")


def load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def page_paths(md: Path, quality_json: Path | None = None, speed_json: Path | None = None) -> dict[str, Path]:
    """write_benchmarks_md's paths for the page `md`: docs/benchmarks.md takes the docs JSON and
    docs/img; any other page (a quick run's) takes the *-quick JSON beside it and an img/ folder there,
    so a smoke run never overwrites the recorded results."""
    md = Path(md)
    if md.resolve() == BENCH_MD.resolve():
        return {"out": md, "quality_json": quality_json or QUALITY_JSON, "speed_json": speed_json or SPEED_JSON,
                "img_dir": IMG_DIR}
    return {"out": md, "quality_json": quality_json or md.parent / "bench-quality-quick.json",
            "speed_json": speed_json or md.parent / "bench-speed-quick.json", "img_dir": md.parent / "img"}


def write_benchmarks_md(quality_json: Path = QUALITY_JSON, speed_json: Path = SPEED_JSON,
                        out: Path = BENCH_MD, img_dir: Path = IMG_DIR) -> Path:
    """Render both sections (whichever JSON exists) into `out`; plots go to `img_dir`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import importlib

    parts = [
        "# Benchmarks: adpdm against the quantizers a user would pick instead",
        "",
        "Written by `tools/bench_report.py` from the JSON that `tools/bench_quality.py` and "
        "`python -m tools.bench_speed` save (do not edit by hand: rerun the commands below). "
        "Peers are optional dependencies of the benchmarks only, installed in an environment of their own "
        "so the test environment stays as CI builds it: `python3 -m venv .venv-bench && .venv-bench/bin/pip "
        "install -c constraints.txt -e '.[cpu,tools,bench]'` (check that torch stays at the pinned CPU build), "
        "then run the benchmarks with `.venv-bench/bin/python`; a peer that is not installed is reported as "
        "missing and the rest runs.",
        "",
    ]
    q = load_json(quality_json)
    s = load_json(speed_json)
    rel = os.path.relpath(img_dir, out.parent)
    for title, module, run, data in (("Quality", "bench_quality", "tools/bench_quality.py", q),
                                     ("Speed", "tools.bench_speed.report", "-m tools.bench_speed", s)):
        if data:
            parts.append(importlib.import_module(module).render_markdown(data, img_dir, rel))
        else:
            parts.append(f"## {title}\n\nNot run yet: `.venv/bin/python {run}`.\n")
    if out.resolve() == BENCH_MD.resolve() and READING_MD.is_file():
        parts.append(READING_MD.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out


if __name__ == "__main__":
    print(write_benchmarks_md())
