"""`adpdm build-engine`: the main job, calibrate -> export -> build, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from adpdm_export.commands import calibration_options as opt


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
    from engines.errors import AdpdmError

    try:
        sizes = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise AdpdmError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise AdpdmError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def build_engine(
    model: Annotated[str, typer.Argument(help="'reference', a diffusers UNet or pipeline folder, or a hub repo id.")] = "reference",
    out: Annotated[Path, typer.Option("--out", help="Build folder (created; resumed when it holds an earlier build).")] = Path("build/reference"),
    backend: Annotated[str, typer.Option("--backend", help="auto (TensorRT where it can run, else onnxruntime) | trt | ort.")] = "auto",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="TensorRT optimization-profile batch sizes.")] = "1,4,16",
    resolution: Annotated[Optional[tuple[int, int]], typer.Option("--resolution", help="H W for the TensorRT optimization profile (default: the model's sample size).")] = None,
    opt_level: Annotated[int, typer.Option("--opt-level", help="TensorRT builder optimization level (0..5).")] = 3,
    force: Annotated[bool, typer.Option("--force", help="Rerun every stage even when its outputs are current.")] = False,
    high_precision: Annotated[Optional[str], typer.Option("--high-precision", help="TensorRT target outside the INT8 layers: fp16 (default) | bf16 | fp32; the onnxruntime target is FP32.")] = None,
    method: opt.Method = "adpdm",
    groups: opt.Groups = None,
    w_bits: opt.WBits = 8,
    a_bits: opt.ABits = 8,
    calib_samples: opt.CalibSamples = 64,
    calib_steps: opt.CalibSteps = 100,
    calib_budget_minutes: opt.CalibBudgetMinutes = None,
    seed: opt.Seed = 0,
    device: opt.Device = "cpu",
    sampling_precision: opt.SamplingPrecision = "fp32",
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
    options: opt.MethodOptions = None,
    progress: opt.ShowProgress = True,
) -> None:
    """Calibrate MODEL with ADP-DM, export one QDQ graph per timestep group, build the engines."""
    from adpdm_export.build_pipeline import build_engine as run_build
    from adpdm_export.build_pipeline import check_resolution, default_targets
    from adpdm_export.build_stages import claimed_build_folder
    import dataclasses

    from adpdm_export.commands.calibrate_cmd import conditions_from_flags
    from adpdm_export.model_loading import load_model
    from adpdm_export.progress import console, stage_progress, stderr_line
    from calibration.configs import DataFreeConfig
    from calibration.cost_estimate import check_budget_minutes
    from calibration.pipeline import resolve_device
    from calibration.qconfig import QuantConfig
    from calibration.trajectories import default_cache_dir
    from engines.errors import AdpdmError
    from engines.platform import pick_backend

    config = opt.method_from_flags(method, groups, stat, percentile, options)
    quant = QuantConfig(w_bits=w_bits, a_bits=a_bits, quantize_residual=quantize_residual,
                        quantize_attention_bmm=quantize_attention_bmm)
    data = DataFreeConfig(samples=calib_samples, steps=calib_steps, precision=sampling_precision)
    if calib_budget_minutes is not None:
        check_budget_minutes(calib_budget_minutes)
    resolve_device(device)
    sizes = _parse_batch_sizes(batch_sizes)
    if not 0 <= opt_level <= 5:
        raise AdpdmError(f"--opt-level must be in 0..5, got {opt_level}")
    chosen = pick_backend(backend)
    targets = default_targets(quant.w_bits, chosen)
    from adpdm_export.high_precision import parse_high_precision

    parse_high_precision(high_precision, targets)  # one line before any work
    check_resolution(resolution, chosen)
    # --out: empty, missing or one of our builds, and no other build in it; checked before loading the model
    with claimed_build_folder(out):
        loaded = load_model(model)
        data.check_for(loaded.num_train_timesteps)
        conds = conditions_from_flags(loaded, calib_samples, class_labels, prompt_embeds, prompts, negative_prompt,
                                      guidance_scale)
        cond, uncond = conds.cond, conds.uncond
        data = dataclasses.replace(data, guidance_scale=conds.guidance_scale)
        console.print(f"[bold]build-engine[/bold] {model} -> {out} (backend {chosen}, {method}, W{w_bits}A{a_bits})")
        with stage_progress(progress) as on_progress:
            summary = run_build(
                loaded, out, config, quant, data, seed=seed, device=device, backend=chosen, targets=targets,
                high_precision=high_precision,
                batch_sizes=sizes, resolution=resolution, opt_level=opt_level, cond=cond, uncond=uncond,
                cache_dir=str(cache_dir or default_cache_dir()), force=force, progress=on_progress,
                say=lambda msg: console.print(f"  {msg}"), log=stderr_line, calib_budget_minutes=calib_budget_minutes,
            )
    print_summary(summary)


def print_summary(summary) -> None:
    """The closing table: groups and their timestep ranges, files and sizes, stage times, parity."""
    from rich.table import Table

    from adpdm_export.progress import console

    m = summary.manifest
    groups = Table(title=f"{summary.out} ({m.backend}, {m.calibration.method}, "
                         f"W{m.calibration.weight_bits}A{m.calibration.act_bits}, tau*={m.calibration.tau_star})")
    for col in ("group", "timesteps", "files", "parity trt / ort (teacher-forced)", "error vs FP (trt / ort)"):
        groups.add_column(col)
    checks = summary.export_report.get("checks", [])

    def worst(k: int, target: str, key: str) -> str:
        vals = [c[key] for c in checks if c["group"] == k and c["target"] == target and c.get(key) is not None]
        return f"{max(vals):.1e}" if vals else "-"

    sizes = {f.path: f.size for f in m.files}
    for g in m.groups:
        names = list(g.graphs.values()) + ([g.engine] if g.engine else [])
        files = ", ".join(f"{n} ({sizes.get(n, 0) / 1e3:.0f} kB)" for n in names)
        ranges = ", ".join(f"{a}-{b}" for a, b in g.timestep_ranges)
        groups.add_row(str(g.id), ranges, files,
                       f"{worst(g.id, 'trt', 'forced_rel_l2')} / {worst(g.id, 'ort', 'forced_rel_l2')}",
                       f"{worst(g.id, 'trt', 'fp_rel_l2')} / {worst(g.id, 'ort', 'fp_rel_l2')}")
    console.print(groups)
    verdicts = sorted({c.get("verdict", "") for c in checks})
    if verdicts:
        console.print(f"parity verdicts: {', '.join(verdicts)} (free-running differences after a rounding tie are "
                      "accepted; see docs/export.md)")
    weights = sorted(set(m.weights.values()))
    console.print("weights: " + ", ".join(f"{w} ({sizes.get(w, 0) / 1e6:.2f} MB)" for w in weights))
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("status")
    stages.add_column("seconds", justify="right")
    for s in summary.stages:
        stages.add_row(s.name, "reused" if s.reused else "ran", f"{s.seconds:.1f}")
    console.print(stages)
    console.print(f"done in {summary.seconds:.1f} s: {summary.out}/manifest.json")


def register(app: typer.Typer) -> None:
    app.command("build-engine")(build_engine)
