"""`adpdm generate --url`: images from a running `adpdm serve` (the sampling loop runs on the server)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def generate(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Server: http://host:port or grpc://host:port."),
    n: int = typer.Option(4, "--n", help="Number of images."),
    steps: int = typer.Option(50, "--steps", help="Sampling steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise (same seed, same images)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim | ddpm | dpmsolver (server default: ddim)."),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Class label for class-conditional models."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Builds of a text-to-image pipeline: the prompt of every image (encoded, guided and decoded by the server)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="With --prompt: the unconditional half (server default ''; SDXL pipelines that force zeros: zeros)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="With --prompt: classifier-free guidance (>= 1; server default 7.5)."),
    out: Path = typer.Option(Path("generated.png"), "--out", help="PNG grid to write."),
    scale: int = typer.Option(4, "--scale", help="Upscale factor of the PNG (nearest neighbour)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Request timeout in seconds."),
) -> None:
    """Ask a running `adpdm serve` for N images and write them as a PNG grid."""
    from engines.errors import AdpdmError

    if out.suffix.lower() != ".png":
        raise AdpdmError(f"--out must name a .png file (got {out})")
    if not timeout > 0:
        raise AdpdmError(f"--timeout must be > 0 seconds, got {timeout}")
    if n < 1 or steps < 1 or seed < 0:
        raise AdpdmError(f"--n and --steps must be >= 1 and --seed >= 0 (got {n}, {steps}, {seed})")
    if prompt is None and (negative_prompt is not None or guidance_scale is not None):
        raise AdpdmError("--negative-prompt and --guidance-scale go with --prompt")
    import torch

    from engines.images import save_grid
    from engines.serving_client import AdpdmClient

    cond = {} if class_label is None else {"class_labels": [class_label]}
    with AdpdmClient(url, timeout_s=timeout) as client:
        images = client.generate(seed=seed, n=n, steps=steps, scheduler=scheduler, prompt=prompt,
                                 negative_prompt=negative_prompt, guidance_scale=guidance_scale, **cond)
        for note in client.notes:
            typer.echo(f"note: {note}", err=True)
    path = save_grid(torch.from_numpy(images.copy()), out, scale=scale)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
