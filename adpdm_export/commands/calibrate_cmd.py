"""`adpdm calibrate`: data-free INT8 calibration of a model's UNet into a CalibrationResult folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adpdm_export.commands import calibration_options as opt


def parse_class_labels(text: Optional[str], loaded) -> Optional[list[int]]:
    from engines.errors import AdpdmError

    if text is None:
        return None
    if "class_labels" not in loaded.conditioning:
        raise AdpdmError("--class-labels given but this model is not class-conditional")
    try:
        labels = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise AdpdmError(f"--class-labels must be comma-separated integers, got {text!r}") from None
    n = loaded.conditioning["class_labels"]["num_classes"]
    bad = [v for v in labels if not 0 <= v < n]
    if not labels or bad:
        raise AdpdmError(f"--class-labels must be in 0..{n - 1} (got {text!r})")
    return labels


def load_prompt_embeds(path: Optional[Path], loaded):
    """(K, L, D) prompt embeddings from a safetensors file (key encoder_hidden_states or its only tensor)."""
    from engines.errors import AdpdmError

    if path is None:
        return None
    if "encoder_hidden_states" not in loaded.conditioning:
        raise AdpdmError("--prompt-embeds given but this model has no cross-attention")
    if not path.is_file():
        raise AdpdmError(f"no such file: {path}")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as e:
        raise AdpdmError(f"cannot read {path} as safetensors ({type(e).__name__}: {str(e)[:200]})") from None
    if "encoder_hidden_states" in tensors:
        t = tensors["encoder_hidden_states"]
    elif len(tensors) == 1:
        t = next(iter(tensors.values()))
    else:
        raise AdpdmError(f"{path} holds {sorted(tensors)}; name the embeddings 'encoder_hidden_states'")
    if t.ndim == 2:
        t = t[None]
    dim = loaded.conditioning["encoder_hidden_states"]["dim"]
    if t.ndim != 3 or t.shape[-1] != dim or t.shape[0] < 1:
        raise AdpdmError(f"{path}: prompt embeddings must be (K, L, {dim}) (got {tuple(t.shape)})")
    return t.float()


def model_conditions(loaded, n: int, class_labels: Optional[list[int]] = None, prompt_embeds=None) -> dict:
    """The user's conditions, else the model's null/default ones, as per-condition tensors."""
    import torch

    cond = loaded.default_condition(n)
    if class_labels is not None:
        cond["class_labels"] = torch.tensor(class_labels, dtype=torch.int64)
    if prompt_embeds is not None:
        cond["encoder_hidden_states"] = prompt_embeds
    return cond


def conditions_from_flags(loaded, n: int, class_labels: Optional[str], prompt_embeds: Optional[Path],
                          prompts: Optional[Path], negative_prompt: Optional[str], guidance_scale: Optional[float]):
    """The calibration conditions of the flags (`text_prompts.calibration_conditions`: the CLI only reads
    the files); notes (truncated prompts) on stderr."""
    import torch

    from adpdm_export.progress import console
    from adpdm_export.text_prompts import calibration_conditions, read_prompts

    labels = parse_class_labels(class_labels, loaded)
    embeds = load_prompt_embeds(prompt_embeds, loaded)
    user = {} if labels is None else {"class_labels": torch.tensor(labels, dtype=torch.int64)}
    if embeds is not None:
        user["encoder_hidden_states"] = embeds
    texts = read_prompts(prompts) if prompts is not None else None
    conds = calibration_conditions(loaded, n, cond=user, prompts=texts, negative_prompt=negative_prompt,
                                   guidance_scale=guidance_scale)
    for note in conds.notes:
        console.print(f"note: {note}")
    return conds


def calibrate(
    model: str = typer.Argument(..., help="'reference', a diffusers UNet or pipeline folder, or a hub repo id."),
    out: Path = typer.Option(..., "--out", help="Folder for calibration.json + calibration.safetensors."),
    method: opt.Method = "minmax",
    groups: opt.Groups = None,
    w_bits: opt.WBits = 8,
    a_bits: opt.ABits = 8,
    calib_samples: opt.CalibSamples = 64,
    calib_steps: opt.CalibSteps = 100,
    calib_budget_minutes: opt.CalibBudgetMinutes = None,
    seed: opt.Seed = 0,
    device: opt.Device = "cpu",
    sampling_precision: opt.SamplingPrecision = "fp32",
    target: str = typer.Option("trt", "--target", "--profile", help="Graph target: trt (Q/DQ on inputs) or ort (also on Conv/MatMul outputs). --profile: old name."),
    stat: opt.Stat = None,
    percentile: opt.Percentile = None,
    class_labels: opt.ClassLabels = None,
    prompt_embeds: opt.PromptEmbeds = None,
    prompts: opt.Prompts = None,
    negative_prompt: opt.NegativePrompt = None,
    guidance_scale: opt.GuidanceScale = None,
    quantize_residual: opt.QuantizeResidual = False,
    quantize_attention_bmm: opt.QuantizeAttentionBmm = False,
    cache_dir: opt.CacheDir = None,
    no_cache: bool = typer.Option(False, "--no-cache", help="Sample trajectories again and do not cache them."),
    batch_size: int = typer.Option(64, "--batch-size", help="UNet batch size during calibration."),
    options: opt.MethodOptions = None,
    progress: opt.ShowProgress = True,
) -> None:
    """Calibrate MODEL's UNet for INT8 (data-free) and write the calibration to --out."""
    from calibration.configs import DataFreeConfig
    from calibration.cost_estimate import check_budget_minutes
    from calibration.pipeline import resolve_device
    from calibration.qconfig import QuantConfig
    import dataclasses

    from engines.errors import AdpdmError
    from engines.file_io import check_output_folder

    config = opt.method_from_flags(method, groups, stat, percentile, options)
    quant = QuantConfig(w_bits=w_bits, a_bits=a_bits, target=target, quantize_residual=quantize_residual,
                        quantize_attention_bmm=quantize_attention_bmm)
    data = DataFreeConfig(samples=calib_samples, steps=calib_steps, precision=sampling_precision)
    if batch_size < 1:
        raise AdpdmError(f"--batch-size must be >= 1, got {batch_size}")
    if calib_budget_minutes is not None:
        check_budget_minutes(calib_budget_minutes)
    resolve_device(device)
    check_output_folder(out)
    from adpdm_export.model_loading import absolute_source, load_model
    from adpdm_export.progress import console, stage_progress, stderr_line
    from calibration.pipeline import calibrate as run_calibration
    from calibration.trajectories import default_cache_dir

    loaded = load_model(model)
    data.check_for(loaded.num_train_timesteps)
    conds = conditions_from_flags(loaded, calib_samples, class_labels, prompt_embeds, prompts, negative_prompt,
                                  guidance_scale)
    cond, uncond = conds.cond, conds.uncond
    data = dataclasses.replace(data, guidance_scale=conds.guidance_scale)
    cache = None if no_cache else (cache_dir or default_cache_dir())
    with stage_progress(progress) as on_progress:
        result = run_calibration(
            loaded.unet, loaded.scheduler_config, config, quant, data=data, seed=seed, cond=cond, uncond=uncond,
            device=device,
            cache_dir=None if cache is None else str(cache), batch_size=batch_size, progress=on_progress,
            log=stderr_line, extra_settings={"model_source": absolute_source(loaded.source), "model_kind": loaded.kind},
            budget_minutes=calib_budget_minutes, on_estimate=lambda estimate: console.print(estimate.summary()),
        )
    result.save(out)
    t = result.timings
    console.print(
        f"wrote {out}/calibration.json ({config.method}, W{result.w_bits}A{result.a_bits}, {result.num_groups} group(s), "
        f"{len(result.activation_scales)} activation / {len(result.weight_scales)} weight quantizers) "
        f"in {t.get('total_s', 0):.1f} s"
    )


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
