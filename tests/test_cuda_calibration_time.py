"""tools/cuda_calibration_time.py without a GPU: it refuses with status 2 and the reason; with the GPU
check and the runs pointed at the CPU, its plan, comparisons and record are those a GPU run writes."""

from __future__ import annotations

import json

import pytest

import tools.cuda_calibration_time as tool

FAST = ["--model", "tiny", "--method", "uniform-groups", "--groups", "2", "--samples", "3", "--steps", "3",
        "--threads", "1"]


def test_without_a_gpu_it_says_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("engines.platform.cuda_status", lambda: (False, "no CUDA GPU usable: test"))
    assert tool.main([*FAST, "--json", str(tmp_path / "t.json")]) == 2
    assert "needs a CUDA GPU: no CUDA GPU usable: test" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_record_of_every_precision(monkeypatch, tmp_path):
    calls = []
    real = tool.run_one

    def on_cpu(model, device, method, data, threads):
        calls.append((device, data.precision))
        return real(model, "cpu", method, data, threads)

    monkeypatch.setattr("engines.platform.cuda_status", lambda: (True, "fake GPU"))
    monkeypatch.setattr(tool, "run_one", on_cpu)
    out_json = tmp_path / "t.json"
    assert tool.main([*FAST, "--precisions", "fp32,bf16", "--json", str(out_json)]) == 0
    assert calls == [("cuda", "fp32"), ("cuda", "bf16"), ("cpu", "fp32")]
    rec = json.loads(out_json.read_text())
    assert set(rec["runs"]) == {"cuda-fp32", "cuda-bf16", "cpu-fp32"}
    assert rec["runs"]["cuda-bf16"]["sampling_precision"] == "bf16"
    assert rec["cpu_vs_cuda"]["same_table"] and rec["cpu_vs_cuda"]["scale_rel_diff_max"] == 0.0
    half = rec["cuda_bf16_vs_fp32"]
    assert 0.0 < half["scale_rel_diff_max"] < 0.1 and half["trajectories_speedup"] > 0


def test_precisions_must_start_with_fp32(monkeypatch, tmp_path):
    monkeypatch.setattr("engines.platform.cuda_status", lambda: (True, "fake GPU"))
    with pytest.raises(SystemExit):
        tool.main([*FAST, "--precisions", "fp16", "--json", str(tmp_path / "t.json")])
