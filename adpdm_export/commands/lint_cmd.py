"""`adpdm lint FILE.onnx...`: check QDQ graphs against the TensorRT explicit-quantization rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def lint(
    files: List[Path] = typer.Argument(..., help="QDQ ONNX graphs (external data is read only from their folder)."),
    allow: Optional[List[str]] = typer.Option(None, "--allow", help="Report but do not fail on this rule (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print {file: [violation, ...]} as JSON on stdout."),
    max_lines: int = typer.Option(40, "--max", help="Print at most this many violations per file (0: all)."),
    high_precision: Optional[str] = typer.Option(
        None, "--high-precision", help="Require this float type outside the FP32 islands: fp16 | bf16 | fp32 (default: the graph's own)."),
) -> None:
    """Lint QDQ graphs: symmetric zero points, positive constant scales, per-channel only on weights (axis 0),
    per-tensor activations, no Q/DQ on weighted-op outputs, opset, scale dtypes, external data inside the folder,
    one float type (FP16/BF16/FP32) outside the documented FP32 islands.

    Exit status 0 when every file passes, 1 when a rule is broken, 2 on a usage error.
    """
    from adpdm_export.progress import console
    from adpdm_export.high_precision import PRECISIONS
    from adpdm_export.qdq_lint import RULES, lint_model
    from engines.errors import AdpdmError

    allowed = set(allow or [])
    unknown = sorted(allowed - set(RULES))
    if unknown:
        raise AdpdmError(f"unknown rule(s) {', '.join(unknown)}; rules: {', '.join(RULES)}")
    if high_precision is not None and high_precision not in PRECISIONS:
        raise AdpdmError(f"unknown high precision {high_precision!r}: use {', '.join(PRECISIONS)}")
    results = {str(f): lint_model(f, high_precision=high_precision) for f in files}
    failing = 0
    if as_json:
        doc = {f: [{"rule": v.rule, "node": v.node, "message": v.message} for v in vs] for f, vs in results.items()}
        typer.echo(json.dumps(doc, indent=1))
    for f, vs in results.items():
        blocking = [v for v in vs if v.rule not in allowed]
        failing += bool(blocking)
        if as_json:
            continue
        if not vs:
            console.print(f"[green]ok[/green] {f}")
            continue
        console.print(f"[red]{len(blocking)} violation(s)[/red] {f}" + (f" ({len(vs) - len(blocking)} allowed)" if len(vs) > len(blocking) else ""))
        shown = vs if max_lines <= 0 else vs[:max_lines]
        for v in shown:
            tag = "allowed" if v.rule in allowed else v.rule
            typer.echo(f"  {v.node}: {v.message} [{tag}]")
        if len(shown) < len(vs):
            typer.echo(f"  ... {len(vs) - len(shown)} more (--max 0 shows all)")
    if failing:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("lint")(lint)
