"""Give freed heap memory back to the operating system between the big steps of a build.

A build-engine on a large UNet frees gigabytes at a time (calibration's activations, the FP32
ONNX template, onnxruntime sessions), but glibc keeps much of it in the process's heap (small and
medium blocks of many threads' arenas), so the resident size stays at the high-water mark and the
next step adds on top of it. `release_heap` collects Python's cycles, then asks glibc to return
free heap pages (`malloc_trim(0)`); elsewhere (musl, macOS, Windows) only the collection runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any, Optional

_LIBC: Any = None  # the loaded libc with malloc_trim, False where there is none


def _malloc_trim() -> Optional[Any]:
    """glibc's `malloc_trim`, or None where the C library has none."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim = libc.malloc_trim
        except (OSError, AttributeError):
            return None
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        _LIBC = libc
    return _LIBC.malloc_trim if _LIBC else None


def release_heap() -> bool:
    """Collect garbage, then trim the C heap; True when memory was handed back to the system
    (malloc_trim found pages to release), False when it had none or is not available."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


__all__ = ["release_heap"]
