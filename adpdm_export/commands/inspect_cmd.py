"""`adpdm inspect DIR`: what a build folder holds (groups, timestep ranges, files, sizes, fusion counts)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_build(
    build_dir: Path = typer.Argument(..., help="A build folder (manifest.json, group graphs, weights)."),
    verify: bool = typer.Option(True, help="Check every file's size and sha256 against the manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Print the groups (timestep ranges, graph files, sizes), weights, engines and fused-op counts of a build."""
    from rich.table import Table

    from adpdm_export.progress import console
    from adpdm_export.qdq_graph_passes import REPORT_NAME
    from adpdm_export.qdq_report import read_report
    from engines.manifest import load_manifest
    from engines.timestep_groups import format_ranges

    m = load_manifest(build_dir, verify=verify)
    sizes = {f.path: f.size for f in m.files}
    report = None
    if REPORT_NAME in sizes:
        try:
            report = read_report(m.path(REPORT_NAME))
        except (OSError, json.JSONDecodeError):
            report = None
    targets = m.targets()
    checks = {(c["target"], c["group"]): c for c in (report or {}).get("checks", [])}
    fusion = (report or {}).get("fusion", {})
    summary = {
        "folder": str(m.root),
        "model": {"type": m.model.type, "source": m.model.source, "sha256": m.model.sha256},
        "backend": m.backend,
        "calibration": {"method": m.calibration.method, "w_bits": m.calibration.weight_bits,
                        "a_bits": m.calibration.act_bits, "groups": m.num_groups},
        "weights": {p: {"file": w, "bytes": sizes.get(w)} for p, w in m.weights.items()},
        "groups": [
            {
                "id": g.id,
                "timestep_ranges": [list(r) for r in g.timestep_ranges],
                "graphs": {p: {"file": f, "bytes": sizes.get(f)} for p, f in g.graphs.items()},
                "engine": None if not g.engine else {"file": g.engine, "bytes": sizes.get(g.engine)},
                "parity": {p: {k: checks[(p, g.id)].get(k) for k in ("parity_rel_l2", "forced_rel_l2", "fp_rel_l2", "verdict")}
                           for p in g.graphs if (p, g.id) in checks},
            }
            for g in m.groups
        ],
        "fusion": {p: {k: f.get(k) for k in ("quantized", "fused", "total", "fused_total", "ratio", "level")}
                   for p, f in fusion.items()},
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    console.print(
        f"[bold]{m.root}[/bold]: {m.model.type} ({m.model.source}), {m.calibration.method} "
        f"W{m.calibration.weight_bits}A{m.calibration.act_bits}, {m.num_groups} group(s), backend {m.backend}"
    )
    table = Table(title=None)
    table.add_column("group", justify="right")
    table.add_column("timesteps")
    for p in targets:
        table.add_column(f"{p} graph")
    if checks:
        for p in targets:
            table.add_column(f"{p} vs FP", justify="right")
    if any(g.engine for g in m.groups):
        table.add_column("engine")
    for g in m.groups:
        row = [str(g.id), format_ranges(g.timestep_ranges)]
        row += [f"{g.graphs[p]} ({_size(sizes.get(g.graphs[p], 0))})" for p in targets]
        if checks:
            row += [f"{checks[(p, g.id)]['fp_rel_l2']:.3g}" if (p, g.id) in checks else "-" for p in targets]
        if any(x.engine for x in m.groups):
            row.append(f"{g.engine} ({_size(sizes.get(g.engine, 0))})" if g.engine else "-")
        table.add_row(*row)
    console.print(table)
    for w in dict.fromkeys(m.weights.values()):
        used = [p for p, x in m.weights.items() if x == w]
        console.print(f"weights: {w} ({_size(sizes.get(w, 0))}), shared by the {'/'.join(used)} graphs")
    for p, f in fusion.items():
        q = ", ".join(f"{k} {v}" for k, v in sorted(f.get("quantized", {}).items()))
        fu = ", ".join(f"{k} {v}" for k, v in sorted(f.get("fused", {}).items())) or "none"
        console.print(f"onnxruntime fusion ({p} graphs): {f.get('fused_total')}/{f.get('total')} quantized ops fused "
                      f"({q}; as {fu})")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_build)
