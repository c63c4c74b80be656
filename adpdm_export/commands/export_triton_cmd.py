"""`adpdm export-triton`: write a standard Triton model repository (NGC container) for a build folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_triton(
    build_dir: Path = typer.Argument(..., help="Build folder (with manifest.json)."),
    out: Path = typer.Option(..., "--out", help="Model repository folder to write."),
    platform: str = typer.Option("tensorrt", "--platform", help="tensorrt (group engines, GPU) | onnxruntime (group graphs, CPU)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Group models' max_batch_size (default: the engines' largest batch)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="TensorRT: let Triton capture CUDA graphs."),
    instances: int = typer.Option(1, "--instances", help="Instances per group model."),
    max_n: int = typer.Option(16, "--max-n", help="generate: most images per request."),
    max_steps: int = typer.Option(250, "--max-steps", help="generate: most sampling steps per request."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (only a repository export-triton wrote: it holds .adpdm-triton-repository)."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Text builds: the pipeline folder whose tokenizer, text encoder and VAE generate gets (copied into the repository; default: the one the build was made from)."),
) -> None:
    """One Triton model per timestep group plus a Python-backend `generate` model; every config.pbtxt validated."""
    from engines.errors import AdpdmError
    import json

    from adpdm_export.model_loading import bundled_pipeline_of_build
    from engines.triton_repository import GENERATE_CONFIG, GENERATE_MODEL, write_repository

    if instances < 1 or max_n < 1 or max_steps < 1:
        raise AdpdmError("--instances, --max-n and --max-steps must be >= 1")
    repo = write_repository(
        build_dir, out, platform=platform, max_batch=max_batch, cuda_graphs=cuda_graphs, instances=instances,
        limits={"max_n": max_n, "max_steps": max_steps}, overwrite=overwrite,
        pipeline=pipeline or bundled_pipeline_of_build(build_dir) or "auto",
    )
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    typer.echo(f"wrote {repo}: models {', '.join(models)} (config.pbtxt validated with Triton's ModelConfig)")
    text = json.loads((repo / GENERATE_MODEL / "1" / GENERATE_CONFIG).read_text()).get("text_pipeline")
    if text:
        typer.echo(f"generate takes prompts: tokenizer, text encoder and VAE copied from {text['copied_from']}")
    typer.echo(f"run: docker run --gpus=1 --rm -p127.0.0.1:8000:8000 -p127.0.0.1:8001:8001 -v {repo.resolve()}:/models "
               f"<image> tritonserver --model-repository=/models   (see docs/serving.md)")


def register(app: typer.Typer) -> None:
    app.command("export-triton")(export_triton)
