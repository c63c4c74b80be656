"""The benchmark scripts' --quick modes run end to end (so the scripts do not rot) and write their
JSON and their section of the page; no number is judged here (speed belongs in the recorded runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "adpdm_export" / "assets" / "reference" / "model_index.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REFERENCE.is_file(), reason="bundled reference model not built yet"),
]


def _run(tool: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`tool`: a script under tools/ (bench_quality.py) or a module run with -m (tools.bench_speed)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    target = [str(ROOT / "tools" / tool)] if tool.endswith(".py") else ["-m", tool]
    return subprocess.run([sys.executable, *target, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_bench_quality_quick(tmp_path):
    out, page = tmp_path / "bench_quality_quick.json", tmp_path / "page.md"
    r = _run("bench_quality.py", "--quick", "--threads", "1", "--json", str(out), "--md", str(page),
             "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    ours = {k: v for k, v in rows.items() if v["family"] == "ours"}
    assert set(ours) == {"W8A8/ours:percentile", "W8A8/ours:adpdm-G4"}
    for rec in ours.values():
        assert rec["error"] is None
        assert 0 < rec["noise_rel_l2"] < 0.5  # a quantized model, not the FP one and not noise
        assert set(rec["noise_rel_l2_buckets"]) == {"0-99", "100-299", "300-599", "600-999"}
        assert rec["forward_passes"] == data["meta"]["calib_forward_passes"] == 8 * 10
    # every peer either ran (a row, maybe with its error) or says why it could not
    from tools.bench_peers import all_peers

    for peer in all_peers():
        ran = any(v["family"] == peer.NAME for v in rows.values())
        assert ran or peer.NAME in data["unavailable"] or "W8A8" not in peer.BITS, peer.NAME
    text = page.read_text()
    assert "## Quality" in text and "ours:adpdm-G4" in text and "quick mode" in text
    assert (tmp_path / "img" / "bench-quality-per-timestep.png").is_file()


REFERENCE_TEXT = ROOT / "adpdm_export" / "assets" / "reference_text" / "model_index.json"


@pytest.mark.skipif(not REFERENCE_TEXT.is_file(), reason="bundled reference-text model not built yet")
def test_bench_quality_quick_text_path(tmp_path):
    """--model reference-text: calibration on the guided trajectories (both halves), rows scored with
    prompt fidelity, kept in their own section of the JSON beside the reference rows, and its table."""
    out, page = tmp_path / "bench_quality_quick.json", tmp_path / "page.md"
    kept = {"bits": "W8A8", "family": "ours", "variant": "percentile", "conv_in_fp": True, "own_scope": None,
            "error": "a reference row already there"}
    out.write_text(json.dumps({"rows": {"W8A8/ours:percentile": kept}, "meta": {"model": "reference"}}))
    r = _run("bench_quality.py", "--quick", "--model", "reference-text", "--threads", "1", "--json", str(out),
             "--md", str(page), "--cache-dir", str(tmp_path / "cache"), "--peers", "ort-static")
    assert r.returncode == 0, r.stderr[-3000:]
    whole = json.loads(out.read_text())
    assert whole["rows"] == {"W8A8/ours:percentile": kept}  # the reference rows untouched
    sec = whole["models"]["reference-text"]
    m = sec["meta"]
    assert m["guidance_scale"] == 5.0  # the model's own
    assert m["calib_items_per_step"] == 16 and m["calib_forward_passes"] == 16 * 10  # 8 seeds x both halves
    rows = sec["rows"]
    assert {"W8A8/ours:percentile", "W8A8/ours:adpdm-G4"} <= set(rows)
    for key, rec in rows.items():
        if rec["family"] == "ort-static" and sec.get("unavailable"):
            continue
        assert rec["error"] is None, (key, rec["error"])
        assert rec["prompt_fidelity_samples"] == 8 and rec["num_seeds"] == 8 and rec["num_samples"] == 16
        assert 0 <= rec["prompt_fidelity"] <= 1 and 0 <= rec["prompt_agreement"] <= 1
        assert 0 < rec["noise_rel_l2_median"] <= rec["noise_rel_l2_max"] < 0.5
        assert rec["psnr_vs_fp_db_min"] <= rec["psnr_vs_fp_db_median"] < 60
    assert "W8A8/ort-static:minmax" in rows or "ort-static" in sec.get("unavailable", {})
    text = page.read_text()
    assert "### reference-text: the text-to-image path (guidance 5)" in text and "| ours:adpdm-G4 | shared |" in text
    assert "failed: a reference row already there" in text  # both models on the page


def test_bench_speed_quick(tmp_path):
    out = tmp_path / "bench_speed_quick.json"
    r = _run("tools.bench_speed", "--quick", "--out-json", str(out), "--no-docs", "--workdir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    for part in ("latency", "dispatch", "rss", "build_engine", "calibration"):
        assert data.get(part), (part, sorted(data))
    # the runner's own cost was measured (the part swaps in a null session, so it breaks with the backend's internals)
    dispatch = data["dispatch"].get("rows") or [data["dispatch"]]
    assert all(row.get("status") == "ok" and row["overhead_ms"] > 0 for row in dispatch), dispatch
    rows = {(row["model"], row["batch"], row["variant"]): row for row in data["latency"]["rows"]}
    for variant in ("pytorch-fp32", "ort-fp32", "ours"):
        row = rows.get(("reference", 1, variant))
        assert row and row["status"] == "ok", (variant, sorted(rows))
        assert row["median_ms"] > 0 and len(row["times_ms"]) >= 2  # raw timings kept, not just the median
    # our row went through the runner over a real build (G groups), and every target has a verdict or a reason
    assert data["targets"] and all("met" in t for t in data["targets"])
    md = out.with_suffix(".md").read_text()
    assert "## Speed" in md and "Quick run" in md


def test_stage_memory_table(tmp_path):
    """The docs' per-stage table from several runs: the newest run's row order, "-" for a label a run
    did not report, the high-water mark against the FP32 weights."""
    sys.path.insert(0, str(ROOT))
    from tools.stage_memory import markdown_table

    def run(name, stages, peak):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"stages": [{"label": k, "peak_rss_mib": v, "seconds": 1.0} for k, v in stages],
                                 "peak_rss_mib": peak, "params_m": 2 ** 20 / 4e6 * 1000, "wall_s": 9.0}))
        return str(p)

    old = run("old", [("load", 10.0), ("export: tracing", 30.0)], 4000.0)
    new = run("new", [("load", 11.0), ("export: parity inputs", 12.0), ("export: tracing", 20.0)], 2000.0)
    rows = markdown_table([old, new]).splitlines()
    assert rows[0] == "| stage | old: peak MiB / s | new: peak MiB / s |"
    assert [r.split(" | ")[0] for r in rows[2:5]] == ["| load", "| export: parity inputs", "| export: tracing"]
    assert rows[3] == "| export: parity inputs | - | 12 / 1.0 |"
    assert "**4000** (4.0x the FP32 weights)" in rows[5] and "**2000** (2.0x the FP32 weights)" in rows[5]


def test_stage_memory_reports_every_stage_as_it_starts():
    """on_mark sees the record after every new stage, so a run killed for memory leaves its stages."""
    sys.path.insert(0, str(ROOT))
    from tools.stage_memory import StageMemory

    seen = []
    with StageMemory(interval=0.01, on_mark=lambda m: seen.append([s["label"] for s in m.stages()])) as mem:
        mem.say("calibrate: running")
        mem.say("export: tracing the quantized UNet (group 0) and building the QDQ template")
    assert seen[0] == ["load"]
    assert seen[1] == ["load", "calibrate"]
    assert seen[2] == ["load", "calibrate", "export: tracing"]
    assert all(s["peak_rss_mib"] > 0 for s in mem.stages())
