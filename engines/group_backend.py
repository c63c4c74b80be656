"""The interface the runner runs a timestep group through, and the one place a backend is chosen.

`TimestepDispatchRunner` only dispatches: it checks inputs against the manifest and the
backend's `InputSpec`, splits a batch by group and calls `GroupBackend.run`. Everything
that differs between onnxruntime sessions (engines/ort_group_sessions.py) and TensorRT
engines (engines/trt_backend.py) stays behind this protocol, and `open_group_backend`
picks and opens one, so the runner holds no backend branches. A backend need not hold
one model per group: for CPU-target builds the default is ONE onnxruntime session fed each
group's constants (engines/ort_one_session.py); `ort_options={"sessions": "per-group"}` opens one
session per group graph, and the rules for falling back to that are in `_open_one_session`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol, Sequence

import torch

from engines.errors import AdpdmError
from engines.manifest_schema import Manifest
from engines.platform import BACKEND_CHOICES, pick_backend

LOGGER = logging.getLogger("adpdm.runtime")
ORT_TARGET_ORDER = ("ort", "trt", "fp")  # which group graphs onnxruntime runs, best first


@dataclass(frozen=True)
class InputSpec:
    """The inputs a backend takes, beyond the UNet graph I/O contract (engines/ort_backend.py).

    names: its input names. batch: (min, max) batch size, max None for no limit.
    height / width: (min, max) sample size of an engine optimization profile; None: only the size the build
        was calibrated for. sequence_length: the one encoder_hidden_states length it takes (None: any).
    limited_by: what sets these limits, for error messages ("TensorRT").
    """

    names: tuple[str, ...]
    batch: tuple[int, Optional[int]] = (1, None)
    height: Optional[tuple[int, int]] = None
    width: Optional[tuple[int, int]] = None
    sequence_length: Optional[int] = None
    limited_by: str = "TensorRT"


class GroupBackend(Protocol):
    """Runs one timestep group of a build on a batch.

    name: "ort" or "trt" (the manifest's backend names). target: which group graphs it runs
    (None for engines). device: where `run` wants its inputs and returns its output.
    """

    name: str
    target: Optional[str]
    device: torch.device
    input_spec: InputSpec

    def run(self, group: int, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Group `group` on `feeds` (input name -> tensor, checked by the caller): its float32 output."""
        ...

    def close(self) -> None: ...


def resolve_backend(manifest: Manifest, backend: str) -> str:
    """"ort" or "trt" for the requested backend ("auto": TensorRT when the build has engines and this
    machine runs them); raises with the reason where "trt" cannot run."""
    if backend not in BACKEND_CHOICES:
        raise AdpdmError(f"unknown backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    has_engines = manifest.backend == "trt"
    if backend == "ort":
        return "ort"
    if backend == "trt":
        if not has_engines:
            raise AdpdmError(
                "this build has no TensorRT engines (manifest backend 'ort'): run `adpdm build-engine --backend trt`, "
                "or use backend='ort'"
            )
        return pick_backend("trt")  # raises with the reason where TensorRT or the GPU is missing
    return "trt" if has_engines and pick_backend("auto") == "trt" else "ort"


def open_group_backend(
    manifest: Manifest,
    backend: str = "auto",
    *,
    providers: Optional[Sequence[Any]] = None,
    threads: Optional[int] = None,
    target: Optional[str] = None,
    cuda_graphs: bool = False,
    ort_options: Optional[Mapping[str, Any]] = None,
) -> GroupBackend:
    """The backend that runs `manifest`'s groups (options as `TimestepDispatchRunner`)."""
    if resolve_backend(manifest, backend) == "trt":
        from engines.trt_backend import TrtGroupEngines

        return TrtGroupEngines(manifest, cuda_graphs=cuda_graphs)
    from engines.ort_group_sessions import OrtGroupBackend, OrtGroupSessions

    target = target or next((p for p in ORT_TARGET_ORDER if p in manifest.targets()), None)
    if target is None:
        raise AdpdmError(f"the build has no ONNX graphs onnxruntime can run (targets: {manifest.targets()})")
    opts = dict(ort_options or {})
    sessions_mode = opts.pop("sessions", "auto")
    if target == "ort":
        # the CPU target's INT8 weights are fused and pre-packed at any level, so level "all" (NCHWc
        # layouts) costs no memory here and runs ~15% faster on small UNets (docs/benchmarks.md)
        opts.setdefault("optimization", "all")
    expected = {"sample", "timestep", *manifest.model.conditioning}
    one = _open_one_session(manifest, sessions_mode, target, providers, threads, opts)
    if one is not None:
        if set(one.input_names) != expected:
            raise AdpdmError(
                f"the shared graph takes inputs {one.input_names} but the manifest describes "
                f"{sorted(expected)}: the build is inconsistent, rebuild it"
            )
        return one
    sessions = OrtGroupSessions(manifest.graph_paths(target), providers, threads, **opts)
    if set(sessions.input_names) != expected:
        raise AdpdmError(
            f"the group graphs take inputs {sessions.input_names} but the manifest describes "
            f"{sorted(expected)}: the build is inconsistent, rebuild it"
        )
    return OrtGroupBackend(sessions, target)


def _open_one_session(manifest: Manifest, mode: str, target: str, providers, threads, opts) -> Optional[GroupBackend]:
    """The one-session backend (engines/ort_one_session.py) where `mode` and the build allow it, else None.

    mode "auto" (default): one session when the build has a shared graph for the CPU target and the
    providers are CPU only, else per-group sessions with a one-line note (logger "adpdm.runtime").
    "one": one session or an AdpdmError saying why not. "per-group": one session per group graph.
    """
    from engines.ort_one_session import SESSION_MODES, fallback_reason, open_one_session

    if mode not in SESSION_MODES:
        raise AdpdmError(f"ort_options['sessions'] must be one of {SESSION_MODES}, got {mode!r}")
    if mode == "per-group":
        return None
    why = fallback_reason(manifest, target, providers)
    if why is not None:
        if mode == "one":
            raise AdpdmError(f"cannot run all groups in one onnxruntime session: {why}")
        if manifest.num_groups > 1 and target == "ort":
            LOGGER.warning(f"note: one onnxruntime session per group ({why})")
        return None
    return open_one_session(manifest, threads, say=LOGGER.warning, **opts)
