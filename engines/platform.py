"""What this machine can run: TensorRT, a CUDA GPU, and which backend `auto` means.

Used by `adpdm doctor`, `build-engine --backend auto` and the runner. Nothing here
raises when TensorRT or a GPU is missing: the *_status functions return (ok, message)
and `require_*` turn a missing piece into one clear AdpdmError line.
"""

from __future__ import annotations

from typing import Any

from engines.errors import AdpdmError

BACKEND_CHOICES = ("auto", "ort", "trt")
MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = "pip install 'adpdm-export[gpu]' on a machine with an NVIDIA GPU and driver"


def _import_tensorrt() -> tuple[Any, str]:
    """(module, "") or (None, why not)."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        return None, f"not installed ({e.name or 'tensorrt'}): {INSTALL_HINT}"
    except Exception as e:  # broken install: missing libnvinfer, CUDA mismatch...
        return None, f"installed but cannot be imported: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    version = getattr(trt, "__version__", None)
    if version is None or not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        return None, "the installed 'tensorrt' package has no TensorRT library in it (a placeholder wheel?)"
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT_MAJOR:
        return None, f"TensorRT {version} is too old: {MIN_TENSORRT_MAJOR} or newer is needed"
    return trt, ""


def tensorrt_status() -> tuple[bool, str]:
    """(available, message): whether the TensorRT Python package (>= 10) imports and is real."""
    trt, why = _import_tensorrt()
    if trt is None:
        return False, why
    return True, f"TensorRT {trt.__version__}"


def cuda_status() -> tuple[bool, str]:
    """(available, message): whether torch sees a CUDA GPU (the TensorRT backend's tensors are torch CUDA tensors)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.version.cuda is None:
        return False, f"no CUDA GPU usable: torch {torch.__version__} is a CPU-only build"
    try:
        if not torch.cuda.is_available():
            return False, f"no CUDA GPU visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
        name, cc = gpu_identity()
    except Exception as e:
        return False, f"CUDA error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    n = torch.cuda.device_count()
    return True, f"{name} (compute capability {cc}){f', {n} GPUs' if n > 1 else ''}, CUDA {torch.version.cuda}"


def gpu_identity(device: int | None = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current (or given) CUDA device."""
    import torch

    dev = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(dev)
    return torch.cuda.get_device_name(dev), f"{major}.{minor}"


def require_tensorrt():
    """The tensorrt module, or one AdpdmError line saying what is missing."""
    trt, why = _import_tensorrt()
    if trt is None:
        raise AdpdmError(f"the TensorRT backend needs TensorRT: {why}")
    ok, msg = cuda_status()
    if not ok:
        raise AdpdmError(f"the TensorRT backend needs a CUDA GPU: {msg}")
    return trt


def pick_backend(requested: str = "auto") -> str:
    """"trt" or "ort". "auto" is "trt" where TensorRT imports and a GPU is visible, else "ort".

    An explicit "trt" on a machine without TensorRT or a GPU is an AdpdmError.
    """
    if requested not in BACKEND_CHOICES:
        raise AdpdmError(f"unknown backend {requested!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if requested == "ort":
        return "ort"
    trt_ok, _ = tensorrt_status()
    gpu_ok, _ = cuda_status() if trt_ok else (False, "")
    if requested == "trt":
        require_tensorrt()
        return "trt"
    return "trt" if trt_ok and gpu_ok else "ort"
