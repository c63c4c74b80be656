"""tools/trt_check.py: one clear line and exit 2 where TensorRT or a GPU is missing; the whole
`--fast` check where they exist (marked `tensorrt`, skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.platform import cuda_status, tensorrt_status

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "trt_check.py"
TRT_OK, TRT_WHY = tensorrt_status()
GPU_OK, GPU_WHY = cuda_status() if TRT_OK else (False, "not checked (no TensorRT)")
try:
    import polygraphy  # noqa: F401

    POLY_OK, POLY_WHY = True, ""
except ImportError:
    POLY_OK, POLY_WHY = False, "polygraphy is not installed"


def run_script(*args: str, timeout: float, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADPDM_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.mark.skipif(TRT_OK and GPU_OK, reason="checks the refusal where TensorRT or a GPU is missing")
def test_without_tensorrt_one_line_exit_2(tmp_path):
    out = tmp_path / "build"
    r = run_script("--model", "reference", "--out", str(out), "--fast", "--json", str(tmp_path / "r.json"),
                   timeout=120, cache=tmp_path / "cache")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT" in lines[0] and lines[0].startswith("trt_check: "), r.stderr
    assert r.stdout == ""
    assert not out.exists() and not (tmp_path / "r.json").exists()  # nothing built before the check


def test_help_lists_the_flags(tmp_path):
    r = run_script("--help", timeout=60, cache=tmp_path / "cache")
    assert r.returncode == 0
    for flag in ("--model", "--out", "--fast", "--iters", "--json"):
        assert flag in r.stdout


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not (TRT_OK and GPU_OK and POLY_OK),
    reason=f"needs TensorRT >= 10, a CUDA GPU and polygraphy: TensorRT: {TRT_WHY}; GPU: {GPU_WHY}"
    + (f"; {POLY_WHY}" if POLY_WHY else ""),
)
def test_fast_check_end_to_end(tmp_path):
    report_path = tmp_path / "report.json"
    r = run_script("--model", "reference", "--out", str(tmp_path / "build"), "--fast", "--iters", "10",
                   "--json", str(report_path), timeout=600, cache=tmp_path / "cache")
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: an accuracy check failed (reported, not a crash)
    report = json.loads(report_path.read_text())
    assert "TensorRT check" in r.stdout
    groups = report["groups"]
    assert len(groups) == 4
    for row in [*groups, report["fp16"]]:
        assert set(row["latency_ms"]) == {"1", "16"} and all(v > 0 for v in row["latency_ms"].values())
        assert row["accuracy"]["errors"]["vs_onnxruntime"]["rel_l2"] >= 0
    for g in groups:  # compared at the group's own timesteps
        assert all(any(lo <= t <= hi for lo, hi in g["timestep_ranges"]) for t in g["compared_timesteps"])
    assert report["seconds"]["total"] < 480
    assert r.returncode == (0 if report["passed"] else 1)
