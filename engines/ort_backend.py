"""onnxruntime sessions for UNet graphs, and a session as a noise predictor.

Graph I/O contract (every graph this project writes): inputs `sample` float32
(B, C, H, W), `timestep` int64 (B,), optionally `encoder_hidden_states` float32
(B, S, D), `class_labels` int64 (B,) and, SDXL layout, `text_embeds` float32 (B, P) and
`time_ids` float32 (B, 6); output `out_sample` float32 (B, C, H, W).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engines.errors import AdpdmError

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "class_labels", "text_embeds", "time_ids")
OUTPUT_NAME = "out_sample"


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise AdpdmError(
            "onnxruntime is not installed: pip install 'adpdm-export[cpu]' (or '[gpu]' for onnxruntime-gpu)"
        ) from None
    return ort


def default_providers() -> list[str]:
    ort = _import_ort()
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def make_session(
    path: str | os.PathLike,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    optimize: bool = True,
    session_options=None,
    arena: bool = True,
):
    """An InferenceSession for `path`; `optimize=False` disables graph optimizations (parity checks);
    `arena=False` returns each tensor as soon as it is dead instead of keeping a run's largest set
    (one-run sessions over large weights: the parity checks)."""
    ort = _import_ort()
    path = Path(path)
    if not path.is_file():
        raise AdpdmError(f"ONNX graph not found: {path}")
    so = session_options or ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not arena:
        so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or default_providers()))


class OrtNoisePredictor:
    """An onnxruntime session behind the sampler's `predict(sample, timestep, **cond)` interface."""

    def __init__(self, session):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        unknown = set(self.input_names) - set(INPUT_NAMES)
        if unknown:
            raise AdpdmError(f"graph has inputs this runner does not know: {sorted(unknown)}")

    def feeds(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> dict[str, np.ndarray]:
        values = {"sample": sample, "timestep": timestep, **cond}
        feeds = {}
        for name in self.input_names:
            if name not in values:
                raise AdpdmError(f"the graph needs input {name!r}, which was not given")
            v = values[name]
            dtype = np.int64 if name in ("timestep", "class_labels") else np.float32
            feeds[name] = np.ascontiguousarray(
                v.detach().cpu().numpy().astype(dtype, copy=False) if isinstance(v, torch.Tensor) else np.asarray(v, dtype)
            )
        return feeds

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        (out,) = self.session.run([OUTPUT_NAME], self.feeds(sample, timestep, **cond))
        return torch.from_numpy(out)
