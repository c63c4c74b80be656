"""Every Python block of docs/python-api.md runs, in order, in one namespace (slow: the reference model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
REFERENCE = Path(__file__).resolve().parents[1] / "adpdm_export" / "assets" / "reference" / "model_index.json"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_code():
    assert len(blocks()) >= 4


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_file(), reason="bundled reference model not built yet")
def test_every_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102 (our own docs)
    out = capsys.readouterr().out
    assert "search_iters must be >= 0, got -5" in out
    assert "2 user" in out and "['activations', 'trajectories', 'weights']" in out
    assert "3580 True" in out  # the cost estimate's pass count and a probed time
    assert (tmp_path / "build" / "manifest.json").is_file() and (tmp_path / "build-all" / "manifest.json").is_file()
