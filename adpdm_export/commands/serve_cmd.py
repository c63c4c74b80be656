"""`adpdm serve`: a build folder on Triton Inference Server (PyTriton), models `unet` and `generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def serve(
    build_dir: Path = typer.Argument(..., help="Build folder (with manifest.json)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address for HTTP, gRPC and metrics (loopback by default)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host (the server has no authentication)."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port (0: any free port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port (0: any free port)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (0: any free port)."),
    max_batch: int = typer.Option(16, "--max-batch", help="unet: largest batch the dynamic batcher forms (and a request may send)."),
    max_queue_delay_us: int = typer.Option(2000, "--max-queue-delay-us", help="unet: how long the batcher waits to fill a batch."),
    max_n: int = typer.Option(16, "--max-n", help="generate: most images per request."),
    max_steps: int = typer.Option(250, "--max-steps", help="generate: most sampling steps per request."),
    backend: str = typer.Option("auto", "--backend", help="auto | ort | trt."),
    threads: int = typer.Option(0, "--threads", help="onnxruntime intra-op threads (0: its default)."),
    exit_timeout: int = typer.Option(3, "--exit-timeout", help="Seconds to wait for in-flight requests on shutdown."),
    verbose: int = typer.Option(0, "--log-verbose", help="Triton log verbosity (0: quiet)."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Text builds: the pipeline folder with the text encoder and VAE (default: the one the build was made from, its manifest's model source)."),
) -> None:
    """Serve BUILD_DIR with Triton: `unet` (mixed-timestep dynamic batching) and `generate` (sampling in the server).

    Stops cleanly on Ctrl-C / SIGTERM. Needs the `serve` extra (nvidia-pytriton).
    """
    import logging

    from adpdm_export.model_loading import bundled_pipeline_of_build
    from engines.serving import AdpdmServer, ServeLimits

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limits = ServeLimits(
        max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, max_n=max_n, max_steps=max_steps,
        exit_timeout_s=exit_timeout,
    )
    server = AdpdmServer(
        build_dir, backend=backend, threads=threads or None, host=host, http_port=http_port, grpc_port=grpc_port,
        metrics_port=metrics_port, limits=limits, allow_remote=allow_remote, log_verbose=verbose,
        pipeline=pipeline or bundled_pipeline_of_build(build_dir) or "auto",
    )
    prompts = f", prompts through {server.text.folder}" if server.text is not None else ""
    typer.echo(f"serving {build_dir}: models unet, generate{prompts} on {server.http_url} and {server.grpc_url} "
               "(Ctrl-C stops)")
    server.serve_forever()
    typer.echo("stopped")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
