"""`adpdm sample`: generate a PNG grid from a model through torch or onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engines.scheduling import SCHEDULERS


def sample_images(
    model: str = typer.Argument(..., help="A build folder (manifest.json), 'reference', a diffusers UNet or pipeline folder, or a hub repo id."),
    n: int = typer.Option(16, "--n", help="Number of images."),
    steps: int = typer.Option(50, "--steps", help="Sampling steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise (same seed, same images on every backend)."),
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid to write."),
    backend: str = typer.Option(
        "auto", "--backend",
        help="Model: torch (auto) | ort (onnxruntime on the FP graph). Build folder: auto | ort | trt.",
    ),
    scheduler: str = typer.Option("ddim", "--scheduler", help=f"One of: {', '.join(SCHEDULERS)}."),
    threads: int = typer.Option(0, "--threads", help="onnxruntime intra-op threads (0: its default)."),
    ort_sessions: str = typer.Option(
        "auto", "--ort-sessions",
        help="Build on onnxruntime: auto (one session for all groups where the build has a shared graph) | one | "
             "per-group (one session per group graph).",
    ),
    scale: int = typer.Option(4, "--scale", help="Upscale factor of the PNG (nearest neighbour)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text pipelines (or builds of one): the prompt of every image."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="With --prompt: the unconditional half (default ''; SDXL pipelines that force zeros: zeros)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="With --prompt: classifier-free guidance (>= 1; default: the pipeline's own (adpdm.json), else 7.5)."),
) -> None:
    """Sample N images from a model or a build and write them as a PNG grid."""
    import dataclasses

    from adpdm_export.progress import console, stage_progress
    from adpdm_export.sampling import check_request, generate, open_source, text_to_image_parts
    from adpdm_export.text_prompts import default_guidance_scale
    from engines.conditioning import default_condition
    from engines.errors import AdpdmError
    from engines.file_io import check_output_folder
    from engines.images import save_grid
    from engines.text_pipeline import DEFAULT_GUIDANCE_SCALE, PromptRequest, guided_conditions

    check_request(n, steps, seed, scheduler)  # before any work (loading, sampling)
    if out.suffix.lower() != ".png":
        raise AdpdmError(f"--out must name a .png file (got {out})")
    if out.is_dir():
        raise AdpdmError(f"--out {out} is a folder: name the .png file to write")
    check_output_folder(out.parent, f"--out {out}: its folder")  # below a file or unwritable: before sampling
    text = request = None
    if prompt is not None:
        # checked before anything loads; the default guidance is the pipeline's own (its adpdm.json)
        request = PromptRequest(prompt, negative_prompt,
                                DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale)
        text = text_to_image_parts(model)  # before the UNet or build is loaded
        if guidance_scale is None:
            request = dataclasses.replace(request, guidance_scale=default_guidance_scale(text.folder))
    elif negative_prompt is not None or guidance_scale is not None:
        raise AdpdmError("--negative-prompt and --guidance-scale go with --prompt")
    src = open_source(model, backend, threads=threads or None, ort_sessions=ort_sessions)
    cond, uncond, guidance, guidance_note = default_condition(src.conditioning, n), None, 1.0, ""
    if text is not None:
        # the same conditions as `adpdm serve`'s generate model (engines.text_pipeline.guided_conditions)
        g = guided_conditions(text.text_encoder, request, n, cond)
        for note in g.notes:
            console.print(f"note: {note}")
        cond, uncond, guidance = g.cond, g.uncond, g.guidance_scale
        guidance_note = f", prompt {prompt!r}, guidance {guidance:g}"
    console.print(f"sampling {n} images x {steps} steps from {src.description}{guidance_note}")
    with stage_progress() as on_progress:
        result = generate(
            src.predictor, src.scheduler_config, src.sample_shape, n, steps, seed,
            cond=cond, scheduler=scheduler, on_step=lambda done, total: on_progress("sampling", done, total),
            guidance_scale=guidance if uncond is not None else 1.0, uncond=uncond,
        )
    images = result.images if text is None else text.decode(result.images)  # latents -> pixels with the VAE
    path = save_grid(images, out, scale=scale)
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_images)
