"""ONE onnxruntime session for all G timestep groups of a CPU-target build (issue 16).

Why: one session per group pre-packs its own copy of the INT8 weights (onnxruntime's Python API
cannot share pre-packed weights between sessions; engines/ort_group_sessions.py), so G groups
cost ~G copies of the weights. The group graphs differ only in a few small constants, so:

1. `derive_one_session` (run by the export, `adpdm_export.qdq_export`): each group's `ort`
   graph is optimized by onnxruntime at level "extended" (QDQ fused into QLinearConv /
   QLinearMatMul / ..., with the group's scales still constants) and saved
   (`SessionOptions.optimized_model_filepath`). The G optimized graphs must be identical node for
   node; the initializers whose values differ between groups (activation scales, re-quantized
   int32 biases) become graph inputs. Written: `unet.shared.ort.onnx` (the graph),
   `unet.shared.ort.data` (its weights) and `unet.shared.groups.npz` (group k's value of each
   such input), all listed and hashed in the manifest (`ort_one_session`, with the onnxruntime
   version and CPU architecture that optimized the graph).
2. `OrtOneSessionBackend` (the runner's default for CPU-target builds,
   `engines.group_backend.open_group_backend`): one session over the shared graph; group k runs
   with group k's constants bound once (an IOBinding per group and thread: a call binds only the
   sample, timestep and conditions; handing the ~120 constants to `run_with_ort_values` on every
   call cost 0.3 ms of Python validation a call, a sixth of a batch-1 step on the reference model).
   Weights are pre-packed once, whatever G is.

An optimized graph saved by onnxruntime holds its contrib ops and fusions of the version and
CPU architecture that made it (onnxruntime's docs: offline mode needs "the exact same options
... and hardware"; which QDQ fusions apply is decided at compile time per architecture, e.g.
`QDQIsInt8Allowed()` is true on ARM only). So the manifest records both, and a build loaded by
another onnxruntime version or architecture is re-derived at load time into a temporary folder
(one line says so), which costs G session creations at load and nothing afterwards.
`fallback_reason` lists when the runner uses per-group sessions instead (docs/runtime.md).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from engines.errors import AdpdmError
from engines.group_backend import InputSpec
from engines.heap import release_heap
from engines.ort_backend import INPUT_NAMES, OUTPUT_NAME, _import_ort

SHARED_GRAPH_NAME = "unet.shared.ort.onnx"
SHARED_WEIGHTS_NAME = "unet.shared.ort.data"
GROUP_CONSTANTS_NAME = "unet.shared.groups.npz"
DERIVE_LEVEL = "extended"  # the level the shared graph is optimized at (fusions, no layout transforms)
SESSION_MODES = ("one", "per-group", "auto")
# onnxruntime transformers whose result depends on initializer VALUES, not only on the graph:
# ConstantSharing merges initializers that happen to hold equal values (two quantizers with the same
# scale in one group but not in another) and CSE merges nodes reading them. Off while deriving, so
# every group's optimized graph has the same nodes.
VALUE_DEPENDENT_OPTIMIZERS = ("ConstantSharing", "CommonSubexpressionElimination")


class NotApplicable(AdpdmError):
    """The one-session rewrite does not apply to these graphs (the message says why)."""


def machine() -> str:
    """The CPU architecture an optimized graph is tied to (x86_64, aarch64, ...)."""
    return platform.machine().lower() or "unknown"


@dataclass
class OneSessionFiles:
    graph: Path
    weights: Path
    constants: Path
    inputs: list[str]
    onnxruntime: str
    machine: str
    constant_bytes: int  # per group


def _level(ort, name: str):
    return {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def _node_key(n) -> tuple:
    return (n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))


def derive_one_session(graphs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> OneSessionFiles:
    """Write the shared graph, its weights and the per-group constants of `graphs` (one per group,
    in group order) into `out_dir`. Raises NotApplicable when the optimized graphs differ in more
    than initializer values."""
    import onnx
    from onnx import helper, numpy_helper

    ort = _import_ort()
    graphs = [Path(g) for g in graphs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    same_dir = all(g.parent.resolve() == out.resolve() for g in graphs)
    tmp = Path(tempfile.mkdtemp(prefix=".one-session-", dir=out))
    try:
        models = []
        for k, g in enumerate(graphs):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.graph_optimization_level = _level(ort, DERIVE_LEVEL)
            so.optimized_model_filepath = str(tmp / f"g{k}.onnx")
            try:
                ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=list(VALUE_DEPENDENT_OPTIMIZERS))
            except Exception as e:
                raise NotApplicable(f"onnxruntime could not optimize {g.name}: {str(e).strip().splitlines()[0]}") from e
            # onnxruntime keeps the weights it did not change as references into the group graph's
            # external file: kept as such when the shared graph is written beside that file
            m = onnx.load(str(tmp / f"g{k}.onnx"), load_external_data=False)
            if not same_dir:
                from onnx.external_data_helper import load_external_data_for_model

                load_external_data_for_model(m, str(g.parent))
            models.append(m)
        ref = models[0]
        ref_nodes = [_node_key(n) for n in ref.graph.node]
        ref_io = [i.SerializeToString() for i in ref.graph.input], [o.SerializeToString() for o in ref.graph.output]
        for k, m in enumerate(models[1:], 1):
            if [_node_key(n) for n in m.graph.node] != ref_nodes:
                raise NotApplicable(f"the optimized graphs of groups 0 and {k} differ in their nodes, not only in constants")
            if ([i.SerializeToString() for i in m.graph.input], [o.SerializeToString() for o in m.graph.output]) != ref_io:
                raise NotApplicable(f"the optimized graphs of groups 0 and {k} differ in their inputs or outputs")
        inits = [{t.name: t for t in m.graph.initializer} for m in models]
        if any(set(d) != set(inits[0]) for d in inits[1:]):
            raise NotApplicable("the optimized group graphs do not have the same initializers")
        if any(len(m.graph.sparse_initializer) for m in models):
            raise NotApplicable("the optimized group graphs have sparse initializers")
        names = [t.name for t in ref.graph.initializer]
        arrays0 = {}
        differ = []
        for n in names:
            t0 = inits[0][n]
            if all(d[n].SerializeToString() == t0.SerializeToString() for d in inits[1:]):
                continue
            if any(d[n].data_location == onnx.TensorProto.EXTERNAL for d in inits):
                raise NotApplicable(f"initializer {n} differs between groups but is stored in the weights file")
            a0 = numpy_helper.to_array(t0)
            rest = [numpy_helper.to_array(d[n]) for d in inits[1:]]
            if any(a.dtype != a0.dtype or a.shape != a0.shape for a in rest):
                raise NotApplicable(f"initializer {n} has another dtype or shape in another group")
            if any(not np.array_equal(a, a0) for a in rest):
                differ.append(n)
                arrays0[n] = a0
        if len(models) > 1 and not differ:
            raise NotApplicable("the optimized group graphs are identical (no group constants found)")
        taken = {i.name for i in ref.graph.input} | {o.name for o in ref.graph.output}
        if set(differ) & taken:
            raise NotApplicable("a group constant has the name of a graph input or output")
        values = [[numpy_helper.to_array(d[n]) for n in differ] for d in inits]
        del inits
        keep = [t for t in ref.graph.initializer if t.name not in set(differ)]
        del ref.graph.initializer[:]
        ref.graph.initializer.extend(keep)
        for n in differ:
            a = arrays0[n]
            ref.graph.input.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
        graph_path, weights_path, const_path = out / SHARED_GRAPH_NAME, out / SHARED_WEIGHTS_NAME, out / GROUP_CONSTANTS_NAME
        weights_path.unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save_model(ref, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=SHARED_WEIGHTS_NAME, size_threshold=1024)
        if not weights_path.is_file():  # every initializer below the threshold: still one (empty) file
            weights_path.write_bytes(b"")
        arrays = {"names": np.array(differ, dtype=np.str_)}
        for k, vals in enumerate(values):
            for i, v in enumerate(vals):
                arrays[f"g{k}_{i}"] = v
        with open(const_path, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(weights_path, os.stat(graph_path).st_mode & 0o777)  # onnx creates it 0600
        return OneSessionFiles(graph_path, weights_path, const_path, differ, ort.__version__, machine(),
                               int(sum(v.nbytes for v in values[0])))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_group_constants(path: Path, num_groups: int) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """(input names, per group {name: array}) from a `unet.shared.groups.npz` (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            per_group = [{n: np.ascontiguousarray(z[f"g{k}_{i}"]) for i, n in enumerate(names)} for k in range(num_groups)]
    except (KeyError, ValueError, OSError) as e:
        raise AdpdmError(f"{path.name} does not hold the constants of {num_groups} groups ({e}): rebuild") from None
    return names, per_group


def open_one_session(manifest, threads: Optional[int] = None, say=None, **options) -> "OrtOneSessionBackend":
    """The one-session backend of a build whose manifest has `ort_one_session`. A shared graph
    optimized by another onnxruntime version or CPU architecture is re-derived from the group
    graphs into a temporary folder first (`say` gets one line)."""
    ort = _import_ort()
    info = manifest.ort_one_session
    if info is None:
        raise AdpdmError("the build has no shared graph for one session")
    graph, constants = manifest.path(info.graph), manifest.path(info.constants)
    if info.onnxruntime == ort.__version__ and info.machine == machine():
        return OrtOneSessionBackend(graph, constants, manifest.num_groups, threads, **options)
    note = (f"the shared graph was optimized by onnxruntime {info.onnxruntime} on {info.machine}, this is "
            f"{ort.__version__} on {machine()}: re-derived from the group graphs at load")
    if say:
        say(f"note: {note}")
    tmp = Path(tempfile.mkdtemp(prefix="adpdm-one-session-"))
    try:
        files = derive_one_session(manifest.graph_paths("ort"), tmp)
        backend = OrtOneSessionBackend(files.graph, files.constants, manifest.num_groups, threads, **options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the session holds what it needs
    backend.derived_at_load = note
    return backend


def parity_vs_group_sessions(
    group_graphs: Sequence[str | os.PathLike],
    graph: str | os.PathLike,
    constants: str | os.PathLike,
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: Optional[int] = 1,
    optimization: str = "all",
) -> list[dict[str, Any]]:
    """Group k's output from the one session vs from its own session (each at `optimization`, the
    runner's level for CPU-target builds) on `feeds[k]`: max |diff|, relative L2, exact or not."""
    ort = _import_ort()
    refs = []  # every group session's output first, one session at a time: one set of pre-packed weights in memory
    for g, f in zip(group_graphs, feeds):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = _level(ort, optimization)
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        refs.append(ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], dict(f))[0])
        release_heap()
    one = OrtOneSessionBackend(graph, constants, len(group_graphs), threads, optimization=optimization)
    out = []
    for k, (ref, f) in enumerate(zip(refs, feeds)):
        got = one.run(k, {n: torch.from_numpy(np.asarray(v)) for n, v in f.items()}).numpy()
        d = np.abs(got.astype(np.float64) - ref)
        rel = float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))
        out.append({"group": k, "max_abs": float(d.max()), "rel_l2": rel, "exact": bool(np.array_equal(got, ref)),
                    "batch": int(next(iter(f.values())).shape[0])})
    one.close()
    return out


def fallback_reason(manifest, target: Optional[str], providers: Optional[Sequence[Any]]) -> Optional[str]:
    """Why this build/configuration runs on per-group sessions instead of one session (None: it need not)."""
    if target != "ort":
        return f"the one session is made from the CPU-target graphs ('ort'), not {target!r}"
    names = [p[0] if isinstance(p, tuple) else p for p in (providers or ["CPUExecutionProvider"])]
    if any(n != "CPUExecutionProvider" for n in names):
        return f"the one session is for the CPU provider only (providers: {names})"
    if manifest.ort_one_session is None:
        return "the build has no shared graph (made before adpdm-export recorded one, or the rewrite did not apply)"
    return None


class OrtOneSessionBackend:
    """All groups of a CPU-target build in ONE onnxruntime session (a `GroupBackend`).

    graph / constants: the shared graph and its per-group constants (`open_one_session` finds them
        from a manifest). optimization: the level the (already fused) graph is opened at; "all" adds
        the NCHWc layout of the float Conv layers, as the per-group sessions get, and gives outputs
        equal to theirs bit for bit (tests/test_ort_one_session.py). spinning / session_config: as
        OrtGroupSessions. mem_pattern: onnxruntime's memory pattern (off: measured to cost memory and no speed).
        share_initializers / shared_arena are accepted and ignored (one session).
    """

    name = "ort"

    def __init__(
        self,
        graph: str | os.PathLike,
        constants: str | os.PathLike,
        num_groups: int,
        threads: Optional[int] = None,
        *,
        optimization: str = "all",
        spinning: bool = False,
        session_config: Optional[Mapping[str, str]] = None,
        mem_pattern: bool = False,
        share_initializers: Any = None,
        shared_arena: Any = None,
    ):
        ort = _import_ort()
        graph, constants = Path(graph), Path(constants)
        self.target: Optional[str] = "ort"
        self.device = torch.device("cpu")
        self.num_groups = int(num_groups)
        self.derived_at_load: Optional[str] = None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = _level(ort, optimization)
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime's memory pattern (one pre-planned block per input shape) cost +20 MiB at G = 4 / batch 1 and
        # +330 MiB at batch 16 on the 35.7M UNet, at no measurable speed gain (docs/runtime.md): off by default
        so.enable_mem_pattern = bool(mem_pattern)
        for k, v in (session_config or {}).items():
            so.add_session_config_entry(k, v)
        try:
            self.session = ort.InferenceSession(str(graph), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AdpdmError(f"onnxruntime could not load {graph.name}: {msg}") from e
        self.constant_names, per_group = load_group_constants(constants, self.num_groups)
        graph_inputs = [i.name for i in self.session.get_inputs()]
        self.input_names = [n for n in graph_inputs if n not in set(self.constant_names)]
        if set(graph_inputs) - set(self.input_names) != set(self.constant_names) or set(self.input_names) - set(INPUT_NAMES):
            raise AdpdmError(f"{graph.name} and {constants.name} do not match (graph inputs {graph_inputs[:6]}...): rebuild")
        self.output_name = OUTPUT_NAME
        # group k's constants as OrtValues, made once, bound into each thread's IOBinding of group k
        self._arrays = per_group
        self._constants = [{n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in d.items()} for d in per_group]
        self._local = threading.local()  # an IOBinding is not thread-safe: one set per calling thread
        self.constant_bytes = int(sum(a.nbytes for a in per_group[0].values())) if per_group else 0
        self.input_spec = InputSpec(names=tuple(self.input_names))

    def _binding(self, group: int):
        """This thread's IOBinding of `group`, its constants bound when it was made."""
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:
            bindings = self._local.bindings = {}
        io = bindings.get(group)
        if io is None:
            io = self.session.io_binding()
            for name, value in self._constants[group].items():
                io.bind_ortvalue_input(name, value)
            bindings[group] = io
        return io

    def run(self, group: int, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        io = self._binding(group)
        arrays = []  # alive until the run is over: the binding points at their memory
        for name in self.input_names:
            v = feeds[name]
            dtype = np.int64 if name in ("timestep", "class_labels") else np.float32
            a = np.ascontiguousarray(v.detach().cpu().numpy().astype(dtype, copy=False))
            arrays.append(a)
            io.bind_cpu_input(name, a)
        io.bind_output(self.output_name, "cpu")  # onnxruntime allocates it for this call's shape
        self.session.run_with_iobinding(io)
        out = io.get_outputs()[0].numpy()
        io.clear_binding_outputs()
        return torch.from_numpy(out)

    def close(self) -> None:
        self._local = threading.local()
        self._constants = []
        self._arrays = []
        self.session = None


__all__ = [
    "GROUP_CONSTANTS_NAME",
    "NotApplicable",
    "OneSessionFiles",
    "OrtOneSessionBackend",
    "SESSION_MODES",
    "SHARED_GRAPH_NAME",
    "SHARED_WEIGHTS_NAME",
    "derive_one_session",
    "fallback_reason",
    "open_one_session",
    "parity_vs_group_sessions",
    "load_group_constants",
    "machine",
]
