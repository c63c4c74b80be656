"""tools/bench_speed without running a benchmark: the command line answers, and the report and
targets modules reproduce, from the recorded docs/bench_speed.json, the targets it holds and the
Speed section of docs/benchmarks.md (the page is generated from the JSON, never edited by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEED_JSON = ROOT / "docs" / "bench_speed.json"


def test_cli_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "tools.bench_speed", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: python -m tools.bench_speed") and "--rss-configs" in r.stdout


@pytest.mark.skipif(not SPEED_JSON.is_file(), reason="no recorded speed benchmark")
def test_recorded_json_renders_the_page_section(tmp_path):
    pytest.importorskip("matplotlib")
    from tools.bench_speed.report import render_markdown
    from tools.bench_speed.targets import evaluate_targets

    data = json.loads(SPEED_JSON.read_text())
    assert evaluate_targets(data) == data["targets"]
    section = render_markdown(data, tmp_path / "img", "img")
    assert section.startswith("## Speed") and section in (ROOT / "docs" / "benchmarks.md").read_text()
    if (data.get("latency") or {}).get("rows"):
        assert (tmp_path / "img" / "bench-speed-latency.png").is_file()
