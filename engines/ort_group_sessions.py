"""G onnxruntime sessions, one per timestep-group graph, sharing what onnxruntime lets them share.

The group graphs of a build are identical except for a few small activation-scale
initializers; every other initializer lives in ONE external weights file that all of
them reference at the same offsets. What the sessions can share, through onnxruntime's
Python API (checked against 1.32; numbers in docs/runtime.md, `tools/measure_ort_rss.py`):

- Weights: the shared external file is memory-mapped once (read-only) and each of its
  tensors is handed to every session with `SessionOptions.add_initializer`, so the
  sessions reference one buffer instead of each reading its own copy. onnxruntime only
  uses that buffer as is where no graph transform rewrites the weight: at optimization
  level "all" the CPU NCHWc layout transform makes a per-session reordered copy of every
  float Conv weight, so sharing pays off at level "extended" (the default here). INT8
  weights read only by DequantizeLinear are not shared: onnxruntime fuses them into
  QLinearConv/MatMulInteger, pre-packs them per session and drops the original.
- Pre-packed weights: the C/C++/C# APIs have `PrepackedWeightsContainer` (sessions reuse
  each other's pre-packed copies of shared initializers); the Python package does not
  expose it (no `onnxruntime.PrepackedWeightsContainer`, no `prepacked_weights_container`
  argument in 1.32), so kernels that pre-pack (QLinearConv, MatMulInteger, Gemm) keep one
  packed copy per session. `prepacked_weights_container_available()` says whether a future
  onnxruntime has it; this class uses it then.
- Activation memory: by default every session has its own CPU arena, grown to the peak of
  its own runs. Here all sessions use ONE environment-level arena
  (`create_and_register_allocator` + `session.use_env_allocators`), since only one group
  runs at a time.
- Threads: one intra-op pool per session; spinning is off by default (an idle session's
  pool spinning after its run would compete with the next group's run).

CUDA provider: weights are copied to the GPU per session (no sharing); the CPU-side
sharing above is switched off there.

`OrtGroupBackend` puts the sessions of a build's UNet group graphs behind the runner's
`GroupBackend` interface (torch tensors in and out).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from engines.errors import AdpdmError
from engines.group_backend import InputSpec
from engines.ort_backend import INPUT_NAMES, OUTPUT_NAME, OrtNoisePredictor, _import_ort, default_providers

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
_SAFE_DTYPES = {np.dtype(t) for t in ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool")}
_ENV_ARENA_REGISTERED = False


def prepacked_weights_container_available() -> bool:
    ort = _import_ort()
    return hasattr(ort, "PrepackedWeightsContainer")


def _register_env_arena(ort) -> bool:
    """One process-wide CPU arena that sessions opt into with session.use_env_allocators=1."""
    global _ENV_ARENA_REGISTERED
    if _ENV_ARENA_REGISTERED:
        return True
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
    except Exception as e:  # already registered by someone else in this process is fine
        if "already" not in str(e).lower():
            return False
    _ENV_ARENA_REGISTERED = True
    return True


@dataclass(frozen=True)
class _ExtInfo:
    location: Path
    offset: int
    length: int
    dtype: int
    dims: tuple[int, ...]


def _external_initializers(graph: Path) -> dict[str, _ExtInfo]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    root = graph.parent.resolve()
    out = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = (root / info.get("location", "")).resolve()
        if not loc.is_relative_to(root) or not loc.is_file():
            raise AdpdmError(f"{graph.name}: external data {info.get('location')!r} of {t.name} is not a file beside the graph")
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        length = int(info["length"]) if "length" in info else n * dt.itemsize
        out[t.name] = _ExtInfo(loc, int(info.get("offset", 0)), length, t.data_type, tuple(int(d) for d in t.dims))
    return out


def _dequantize_only(graph: Path) -> set[str]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(node.op_type if i == 0 else f"{node.op_type}:{i}")
    return {n for n, ops in consumers.items() if ops == {"DequantizeLinear"}}


def shared_initializers(graphs: Sequence[Path]) -> dict[str, np.ndarray]:
    """Arrays (views into read-only memory maps) for initializers every graph takes from the same bytes."""
    import onnx

    infos = [_external_initializers(Path(g)) for g in graphs]
    common = {n: i for n, i in infos[0].items() if all(other.get(n) == i for other in infos[1:])}
    # Weights read only by DequantizeLinear are fused into QLinearConv/MatMulInteger and
    # pre-packed per session, after which onnxruntime drops the original; a shared copy
    # would only stay resident beside the packed ones (measured: +1x the INT8 weights).
    for name in _dequantize_only(Path(graphs[0])):
        common.pop(name, None)
    maps: dict[Path, np.memmap] = {}
    arrays = {}
    for name, i in common.items():
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.dtype))
        n = int(np.prod(i.dims, dtype=np.int64)) if i.dims else 1
        if dt not in _SAFE_DTYPES or n == 0 or i.length != n * dt.itemsize:
            continue  # packed sub-byte types, strings, empty tensors: let onnxruntime load those
        mm = maps.get(i.location)
        if mm is None:
            mm = maps[i.location] = np.memmap(i.location, dtype=np.uint8, mode="r")
        if i.offset + i.length > mm.size:
            raise AdpdmError(f"external data of {name} runs past the end of {i.location.name} (truncated file?)")
        a = mm[i.offset : i.offset + i.length].view(dt).reshape(i.dims)
        if not a.flags.aligned:
            a = np.ascontiguousarray(a.copy())
        arrays[name] = a
    return arrays


class OrtGroupSessions:
    """One onnxruntime session per group graph; `run(k, feeds)` runs group k.

    optimization: onnxruntime graph optimization level ("extended" by default, see above).
    share_initializers: hand the common external weights to every session from one memory map
        ("auto": on for the CPU provider, off for CUDA).
    shared_arena: one environment-level CPU arena for all sessions ("auto": CPU provider only).
    spinning: allow intra-op threads to spin after a run (onnxruntime's default is on).
    """

    def __init__(
        self,
        graphs: Sequence[str | os.PathLike],
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        *,
        optimization: str = "extended",
        share_initializers: bool | str = "auto",
        shared_arena: bool | str = "auto",
        spinning: bool = False,
        session_config: Mapping[str, str] | None = None,
    ):
        ort = _import_ort()
        if not graphs:
            raise AdpdmError("no group graphs to load")
        if optimization not in OPTIMIZATION_LEVELS:
            raise AdpdmError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        self.graphs = [Path(g) for g in graphs]
        for g in self.graphs:
            if not g.is_file():
                raise AdpdmError(f"ONNX graph not found: {g}")
        self.providers = list(providers or default_providers())
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        cpu_only = all(n == "CPUExecutionProvider" for n in names)
        self.optimization = optimization
        self.share_initializers = cpu_only if share_initializers == "auto" else bool(share_initializers)
        want_arena = cpu_only if shared_arena == "auto" else bool(shared_arena)
        self.shared_arena = want_arena and _register_env_arena(ort)

        self._shared: dict[str, Any] = {}
        self._arrays: dict[str, np.ndarray] = {}
        if self.share_initializers:
            self._arrays = shared_initializers(self.graphs)
            self._shared = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._arrays.items()}
        self.shared_bytes = int(sum(a.nbytes for a in self._arrays.values()))

        level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        container = ort.PrepackedWeightsContainer() if prepacked_weights_container_available() else None
        self.sessions = []
        for g in self.graphs:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.graph_optimization_level = level
            if threads:
                so.intra_op_num_threads = int(threads)
                so.inter_op_num_threads = 1
            if not spinning:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.shared_arena:
                so.add_session_config_entry("session.use_env_allocators", "1")
            for k, v in (session_config or {}).items():
                so.add_session_config_entry(k, v)
            for name, value in self._shared.items():
                so.add_initializer(name, value)
            self.sessions.append(self._session(ort, g, so, container))
        self._predictors: dict[int, OrtNoisePredictor] = {}
        outs = [o.name for o in self.sessions[0].get_outputs()]
        self.output_name = OUTPUT_NAME if OUTPUT_NAME in outs else outs[0]
        self.input_names = [i.name for i in self.sessions[0].get_inputs()]
        for g, sess in zip(self.graphs, self.sessions):
            names = [i.name for i in sess.get_inputs()]
            if names != self.input_names:
                raise AdpdmError(f"group graph {g.name} has inputs {names}, group 0 has {self.input_names}")

    def _session(self, ort, graph: Path, so, container):
        try:
            if container is not None:
                try:
                    return ort.InferenceSession(
                        str(graph), sess_options=so, providers=self.providers, prepacked_weights_container=container
                    )
                except TypeError:  # exposed under another signature: do without it
                    pass
            return ort.InferenceSession(str(graph), sess_options=so, providers=self.providers)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AdpdmError(f"onnxruntime could not load {graph.name}: {msg}") from e

    def __len__(self) -> int:
        return len(self.sessions)

    def predictor(self, k: int) -> OrtNoisePredictor:
        """Group k's session as a noise predictor (UNet graph I/O contract of engines.ort_backend)."""
        if k not in self._predictors:
            self._predictors[k] = OrtNoisePredictor(self.sessions[k])
        return self._predictors[k]

    def run(self, k: int, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Group k's first output (`out_sample` for UNet graphs) for numpy feeds."""
        return self.sessions[k].run([self.output_name], dict(feeds))[0]

    def close(self) -> None:
        self.sessions.clear()
        self._predictors.clear()
        self._shared.clear()
        self._arrays.clear()


class OrtGroupBackend:
    """A build's group graphs in OrtGroupSessions as a `GroupBackend`: torch tensors in and out, on the CPU.

    Any batch size; only the sample size the build was calibrated for.
    """

    name = "ort"

    def __init__(self, sessions: OrtGroupSessions, target: str):
        self.sessions = sessions
        self.target: str | None = target
        self.device = torch.device("cpu")
        self.input_spec = InputSpec(names=tuple(sessions.input_names))

    def run(self, group: int, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.sessions.predictor(group)(**feeds)

    def close(self) -> None:
        self.sessions.close()


__all__ = [
    "INPUT_NAMES",
    "OPTIMIZATION_LEVELS",
    "OrtGroupBackend",
    "OrtGroupSessions",
    "prepacked_weights_container_available",
    "shared_initializers",
]
