"""`adpdm doctor`: what this machine can run, and what `build-engine` would use."""

from __future__ import annotations

import platform

import typer


def doctor() -> None:
    """Print Python/torch/onnxruntime versions and providers, TensorRT and GPU status, the build backend."""
    from rich.markup import escape
    from rich.table import Table

    from adpdm_export import __version__
    from adpdm_export.progress import console
    from engines.platform import cuda_status, pick_backend, tensorrt_status

    import torch

    table = Table(show_header=False, box=None)

    def row(name: str, value: str) -> None:
        table.add_row(name, escape(value))  # messages hold pip extras such as [gpu]: not markup
    row("adpdm-export", __version__)
    row("python", platform.python_version())
    row("torch", torch.__version__)
    try:
        import onnxruntime as ort

        row("onnxruntime", f"{ort.__version__} (providers: {', '.join(ort.get_available_providers())})")
    except ImportError:
        row("onnxruntime", "not installed: pip install 'adpdm-export[cpu]'")
    gpu_ok, gpu_msg = cuda_status()
    trt_ok, trt_msg = tensorrt_status()
    row("CUDA GPU", gpu_msg)
    row("TensorRT", trt_msg)
    backend = pick_backend("auto")
    why = "TensorRT and a GPU are present" if backend == "trt" else "TensorRT or a GPU is missing"
    row("build-engine --backend auto", f"{backend} ({why})")
    console.print(table, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
