"""`qdq_report.json`, the QDQ export's checks (parity, lint, fusion): its key names on disk.

The report keeps the historical key names of the graph target ("trt" / "ort"): "profiles"
for the targets exported and "profile" in each entry of "checks". `report_to_disk` (what
`QdqExport.report` returns) and `report_from_disk` / `read_report` (what the build and
`adpdm inspect` read) are the one place that maps them to the code's names ("targets",
"target"); reports written before the rename load unchanged, and new ones are byte-compatible.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from engines.json_files import read_json

TARGETS_KEY = "profiles"  # historical name of the report's list of graph targets
CHECK_TARGET_KEY = "profile"  # historical name of a check's graph target


def _renamed(d: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """`d` with key `old` called `new`, in the same position (the file's key order is kept)."""
    return {(new if k == old else k): v for k, v in d.items()}


def report_to_disk(report: Mapping[str, Any]) -> dict[str, Any]:
    """The on-disk form of a report in code names ("targets", checks' "target")."""
    out = _renamed(report, "targets", TARGETS_KEY)
    if isinstance(out.get("checks"), list):
        out["checks"] = [_renamed(c, "target", CHECK_TARGET_KEY) for c in out["checks"]]
    return out


def report_from_disk(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A report as read from qdq_report.json, in code names ("targets", checks' "target")."""
    out = _renamed(doc, TARGETS_KEY, "targets")
    if isinstance(out.get("checks"), list):
        out["checks"] = [_renamed(c, CHECK_TARGET_KEY, "target") for c in out["checks"]]
    return out


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Load qdq_report.json in code names (an unreadable report is one AdpdmError line)."""
    return report_from_disk(read_json(path, "export report"))


__all__ = ["CHECK_TARGET_KEY", "TARGETS_KEY", "read_report", "report_from_disk", "report_to_disk"]
