"""`adpdm eval`: quality of a calibration against its FP model on held-out seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer


def reference_fd_inputs(loaded) -> tuple[Any, Any, Optional[str]]:
    """(feature_fn, real_stats, why_not) from the bundled digits classifier, for 1x16x16 models."""
    from engines.errors import AdpdmError

    if tuple(loaded.sample_shape) != (1, 16, 16):
        return None, None, f"no feature extractor for {loaded.sample_shape} samples (digits classifier: 1x16x16)"
    try:
        from adpdm_export.reference import load_reference_classifier, reference_real_feature_stats

        clf = load_reference_classifier()
        stats = reference_real_feature_stats()
    except (AdpdmError, ImportError, OSError) as e:
        return None, None, f"digits classifier unavailable ({e})"
    return clf.features, stats, None


def eval_calibration(
    calib_dir: Path = typer.Argument(..., help="A folder written by `adpdm calibrate`."),
    model: Optional[str] = typer.Option(None, "--model", help="The model (default: the one named in the calibration)."),
    samples: int = typer.Option(64, "--samples", help="Held-out seeds (distinct from the calibration seeds)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps (default: the calibration's)."),
    target: Optional[str] = typer.Option(None, "--target", "--profile", help="Simulate graph target trt or ort (default: the calibration's). --profile: old name."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Trajectory cache (see `adpdm calibrate`)."),
    batch_size: int = typer.Option(64, "--batch-size", help="UNet batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Noise-prediction error, PSNR vs FP samples and Frechet distance of a calibration."""
    from adpdm_export.commands.calibrate_cmd import model_conditions
    from adpdm_export.progress import stage_progress
    from calibration.pipeline import resolve_device
    from engines.errors import AdpdmError

    if samples < 2 or batch_size < 1 or (steps is not None and steps < 1):
        raise AdpdmError("--samples must be >= 2, --steps and --batch-size >= 1")
    if target not in (None, "trt", "ort"):
        raise AdpdmError(f"--target must be trt or ort, got {target!r}")
    dev = resolve_device(device)
    from calibration.result import CalibrationResult

    result = CalibrationResult.load(calib_dir)
    settings = result.config.get("calibration", {})
    source = model or settings.get("model_source")
    if not source:
        raise AdpdmError(f"{calib_dir} does not name its model; pass --model")
    from adpdm_export.model_loading import load_model
    from adpdm_export.progress import console
    from calibration.metrics import evaluate
    from calibration.quant_unet import quantize_model, set_target
    from calibration.trajectories import default_cache_dir, generate_trajectories, heldout_seed

    loaded = load_model(source)
    if loaded.sha256 != result.model_sha256:
        raise AdpdmError(
            f"{calib_dir} was calibrated for model {result.model_sha256[:12]}, {source} is {loaded.sha256[:12]}: "
            "recalibrate or pass the right --model"
        )
    if float(settings.get("guidance_scale", 1.0)) > 1.0:
        raise AdpdmError("adpdm eval does not measure guided text-to-image calibrations yet (prompt fidelity and "
                         "guided held-out sampling are issue 14's next part)")
    n_steps = steps or int(settings.get("calib_steps", 100))
    seed = heldout_seed(int(settings.get("seed", 0)))
    unet = loaded.unet.to(dev)
    cond = model_conditions(loaded, samples)
    with stage_progress(progress) as on_progress:
        heldout = generate_trajectories(
            unet, loaded.scheduler_config, num_samples=samples, num_steps=n_steps, seed=seed, cond=cond,
            batch_size=batch_size, cache_dir=str(cache_dir or default_cache_dir()), model_sha=loaded.sha256,
            progress=lambda d, t: on_progress("FP held-out", d, t),
        )
        qmodel = quantize_model(unet, result=result)
        if target:
            set_target(qmodel, target)
        feature_fn, real_stats, why = reference_fd_inputs(loaded)
        metrics = evaluate(
            qmodel, loaded.scheduler_config, heldout, feature_fn=feature_fn, real_stats=real_stats,
            batch_size=batch_size, progress=on_progress,
        )
    metrics.update(
        method=result.method, w_bits=result.w_bits, a_bits=result.a_bits, groups=result.num_groups,
        # the --json key keeps its historical name "profile" for the graph target
        profile=target or result.target, heldout_seed=seed, fd_note=why,
    )
    if metrics["off_range_count"]:  # on stderr, also with --json
        seeds = ", ".join(str(s) for s in metrics["off_range_seeds"][:8])
        more = " ..." if metrics["off_range_count"] > 8 else ""
        console.print(
            f"[yellow]warning:[/] {metrics['off_range_count']} of {samples} FP held-out trajectories leave the data range "
            f"(seeds {seeds}{more}); they dominate the pooled noise rel-L2: judge by the per-sample median",
            highlight=False,
        )
    if as_json:
        typer.echo(json.dumps(metrics, allow_nan=True))
        return
    fd = "n/a" if metrics["fd"] is None else f"{metrics['fd']:.3f} (FP {metrics['fd_fp']:.3f})"
    console.print(
        f"{result.method} W{result.w_bits}A{result.a_bits} G={result.num_groups} ({metrics['profile']}), "
        f"{samples} held-out seeds from {seed}, DDIM {n_steps} steps:\n"
        f"  noise rel-L2 per sample: median {metrics['noise_rel_l2_median']:.4f}, p90 {metrics['noise_rel_l2_p90']:.4f}, "
        f"max {metrics['noise_rel_l2_max']:.4f} (seed {metrics['noise_rel_l2_max_seed']}); pooled {metrics['noise_rel_l2']:.4f}\n"
        f"  PSNR vs FP {metrics['psnr_vs_fp_db']:.2f} dB, FD {fd}, off-range FP trajectories {metrics['off_range_count']}"
        + (f" [{why}]" if why else ""),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_calibration)
