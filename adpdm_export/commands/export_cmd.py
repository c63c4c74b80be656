"""`adpdm export`: a model to ONNX (the FP graph; QDQ graphs per group with --calibration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export(
    model: str = typer.Argument(..., help="'reference', a diffusers UNet or pipeline folder, or a hub repo id."),
    out: Path = typer.Option(..., "--out", help="Output folder (created if missing)."),
    opset: int = typer.Option(19, help="ONNX opset (>= 19)."),
    check: bool = typer.Option(True, help="Compare onnxruntime against PyTorch on random inputs."),
) -> None:
    """Export MODEL's UNet to an FP ONNX graph with its weights in one external file."""
    from adpdm_export.model_loading import load_model
    from adpdm_export.onnx_export import check_opset, check_parity, example_inputs, export_onnx
    from adpdm_export.progress import console

    check_opset(opset)
    loaded = load_model(model)
    with console.status(f"exporting {loaded.kind} ({model}) to ONNX"):
        exported = export_onnx(
            loaded.unet, out / "unet.onnx", example_inputs(loaded.sample_shape, loaded.conditioning), opset=opset
        )
        if check:
            check_parity(loaded.unet, exported, example_inputs(loaded.sample_shape, loaded.conditioning, batch=3, seed=1))
    (out / "scheduler_config.json").write_text(json.dumps(loaded.scheduler_config, indent=2))
    console.print(f"wrote {exported.graph} and {exported.weights.name} ({exported.weights.stat().st_size / 1e6:.1f} MB)")
    if check:
        console.print(f"onnxruntime vs PyTorch: max |diff| {exported.max_abs_diff:.2e} ({exported.rel_diff:.2e} of output scale)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
