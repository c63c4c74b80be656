"""`adpdm export`: a model to ONNX: the FP graph, or with --calibration one QDQ graph per timestep group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export(
    model: str = typer.Argument(..., help="'reference', a diffusers UNet or pipeline folder, or a hub repo id."),
    out: Path = typer.Option(..., "--out", help="Output folder (created if missing)."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="A calibration folder (adpdm calibrate): export QDQ graphs per timestep group."
    ),
    target: str = typer.Option("both", "--target", "--profile", help="QDQ graphs for: trt | ort (onnxruntime CPU) | both. --profile: old name."),
    opset: int = typer.Option(19, help="ONNX opset (>= 19)."),
    high_precision: Optional[str] = typer.Option(
        None, "--high-precision", help="TensorRT target outside the INT8 layers: fp16 (default) | bf16 | fp32; the onnxruntime target is FP32."
    ),
    check: bool = typer.Option(True, help="Compare onnxruntime against PyTorch (parity per group with --calibration)."),
) -> None:
    """Export MODEL's UNet to ONNX with its weights in one external file (QDQ per group with --calibration)."""
    from adpdm_export.model_loading import load_model
    from adpdm_export.onnx_export import check_opset
    from adpdm_export.progress import console

    check_opset(opset)
    if calibration is None and high_precision is not None:
        from engines.errors import AdpdmError

        raise AdpdmError("--high-precision applies to the QDQ graphs: give --calibration")
    if calibration is not None:
        from adpdm_export.build_stages import claimed_build_folder
        from adpdm_export.qdq_export import check_supported, export_qdq_for, parse_targets
        from calibration.result import CalibrationResult

        from adpdm_export.high_precision import parse_high_precision

        targets = parse_targets(target)
        precision = parse_high_precision(high_precision, targets)
        # a QDQ export is a build folder: missing, empty or one of ours, one writer at a time
        with claimed_build_folder(out):
            loaded = load_model(model)
            result = CalibrationResult.load(calibration, expected_model_sha256=loaded.sha256)
            check_supported(result, targets)
            exp = export_qdq_for(loaded, result, out, target=targets, check=check, high_precision=precision,
                                 say=lambda msg: console.print(f"  {msg}"))
        console.print(
            f"wrote {exp.num_groups} group graph(s) x {', '.join(exp.targets)} target(s), {exp.weights.name} and "
            f"manifest.json to {out}"
        )
        for line in exp.summary_lines():
            console.print(f"  {line}")
        return

    from adpdm_export.onnx_export import check_parity, example_inputs, export_onnx
    from engines.file_io import check_output_folder

    check_output_folder(out)
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
