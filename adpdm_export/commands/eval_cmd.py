"""`adpdm eval`: quality of a calibration against its FP model on held-out seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer


def reference_classifier_inputs(image_shape) -> tuple[Any, Any, Optional[str]]:
    """(classifier, real_stats, why_not): the bundled digits classifier (its features feed the Frechet
    distance, its logits prompt fidelity), for 1x16x16 images (pixels, or a VAE's decoded latents)."""
    from engines.errors import AdpdmError

    if tuple(image_shape) != (1, 16, 16):
        return None, None, f"no feature extractor for {tuple(image_shape)} samples (digits classifier: 1x16x16)"
    try:
        from adpdm_export.reference import load_reference_classifier, reference_real_feature_stats

        clf = load_reference_classifier()
        stats = reference_real_feature_stats()
    except (AdpdmError, ImportError, OSError) as e:
        return None, None, f"digits classifier unavailable ({e})"
    return clf, stats, None


def text_eval_inputs(loaded, samples: int, prompts: Optional[Path], negative_prompt: Optional[str], guidance: float):
    """What evaluating a text pipeline's calibration needs: (cond, uncond, decode, image_shape, labels,
    prompt_note). Prompts: the file given, else the pipeline's defaults (its calibration prompts);
    labels: the digit each seed's prompt names, None (with the reason) when a prompt names none."""
    import torch

    from adpdm_export.text_prompts import calibration_conditions, default_prompts, read_prompts
    from calibration.prompt_fidelity import digits_of_prompts
    from engines.errors import AdpdmError
    from engines.text_pipeline import load_latent_decoder

    folder = loaded.text_encoder.folder
    texts = read_prompts(prompts) if prompts is not None else default_prompts(folder)
    conds = calibration_conditions(loaded, samples, prompts=texts, negative_prompt=negative_prompt,
                                   guidance_scale=guidance)
    cond, uncond = conds.cond, conds.uncond
    decoder = load_latent_decoder(folder)
    decode = None if decoder is None else decoder.decode
    image_shape = tuple(loaded.sample_shape)
    if decode is not None:
        image_shape = tuple(decode(torch.zeros(1, *loaded.sample_shape)).shape[1:])
    try:
        digits = digits_of_prompts(texts)
    except AdpdmError as e:
        return cond, uncond, decode, image_shape, None, f"no prompt fidelity: {e}"
    return cond, uncond, decode, image_shape, [digits[i % len(digits)] for i in range(samples)], None


def eval_calibration(
    calib_dir: Path = typer.Argument(..., help="A folder written by `adpdm calibrate`."),
    model: Optional[str] = typer.Option(None, "--model", help="The model (default: the one named in the calibration)."),
    samples: int = typer.Option(64, "--samples", help="Held-out seeds (distinct from the calibration seeds)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps (default: the calibration's)."),
    target: Optional[str] = typer.Option(None, "--target", "--profile", help="Simulate graph target trt or ort (default: the calibration's). --profile: old name."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Trajectory cache (see `adpdm calibrate`)."),
    batch_size: int = typer.Option(64, "--batch-size", help="UNet batch size."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text pipelines: the held-out prompts, one a line "
                                           "(default: the pipeline's own prompt file, else generic captions)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Text pipelines: the unconditional "
                                                  "half of guidance (default '')."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Noise-prediction error, PSNR vs FP samples, Frechet distance (and, for text-conditional digits
    models, prompt fidelity) of a calibration. A guided calibration is judged on guided held-out samples
    at its own guidance scale."""
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
    guidance = float(settings.get("guidance_scale", 1.0))
    n_steps = steps or int(settings.get("calib_steps", 100))
    seed = heldout_seed(int(settings.get("seed", 0)))
    unet = loaded.unet.to(dev)
    uncond, decode, labels, prompt_note = None, None, None, None
    if loaded.text_encoder is not None:
        cond, uncond, decode, image_shape, labels, prompt_note = text_eval_inputs(
            loaded, samples, prompts, negative_prompt, guidance)
    elif prompts is not None or negative_prompt is not None:
        raise AdpdmError("--prompts and --negative-prompt need a text-to-image pipeline folder")
    else:
        cond, image_shape = model_conditions(loaded, samples), loaded.sample_shape
    with stage_progress(progress) as on_progress:
        heldout = generate_trajectories(
            unet, loaded.scheduler_config, num_samples=samples, num_steps=n_steps, seed=seed, cond=cond,
            batch_size=batch_size, cache_dir=str(cache_dir or default_cache_dir()), model_sha=loaded.sha256,
            progress=lambda d, t: on_progress("FP held-out", d, t), guidance_scale=guidance, uncond=uncond,
        )
        qmodel = quantize_model(unet, result=result)
        if target:
            set_target(qmodel, target)
        clf, real_stats, why = reference_classifier_inputs(image_shape)
        metrics = evaluate(
            qmodel, loaded.scheduler_config, heldout, feature_fn=None if clf is None else clf.features,
            real_stats=real_stats, batch_size=batch_size, progress=on_progress, decode=decode,
            classifier=clf if labels is not None else None, labels=labels,
        )
    metrics.update(
        method=result.method, w_bits=result.w_bits, a_bits=result.a_bits, groups=result.num_groups,
        # the --json key keeps its historical name "profile" for the graph target
        profile=target or result.target, heldout_seed=seed, fd_note=why, guidance_scale=guidance,
        prompt_note=prompt_note if why is None else why,
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
        f"  PSNR vs FP {metrics['psnr_vs_fp_db']:.2f} dB (per sample: median {metrics['psnr_vs_fp_db_median']:.2f}, "
        f"min {metrics['psnr_vs_fp_db_min']:.2f}), FD {fd}, off-range FP trajectories {metrics['off_range_count']}"
        + (f" [{why}]" if why else "")
        + (f"\n  prompt fidelity {metrics['prompt_fidelity']:.3f} (FP {metrics['prompt_fidelity_fp']:.3f}), "
           f"p(asked digit) median {metrics['prompt_prob_median']:.3f}, p10 {metrics['prompt_prob_p10']:.3f}, "
           f"min {metrics['prompt_prob_min']:.3f} (seed {metrics['prompt_prob_min_seed']}); agreement with FP "
           f"{metrics['prompt_agreement']:.3f}; guidance {guidance:g}" if "prompt_fidelity" in metrics else "")
        + (f"\n  [{prompt_note}]" if prompt_note and why is None else ""),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_calibration)
