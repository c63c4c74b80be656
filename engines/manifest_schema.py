"""The schema of `manifest.json`: the dataclasses a build folder is described by, and their checks.

Kept apart from reading and writing (engines/manifest.py) so code that assembles a manifest
(the export, the TensorRT build) needs no file handling, and the format has one description.

A build folder holds one ONNX graph per (timestep group, graph target: "trt", "ort" or
"fp"), one external weights file per target (possibly the same file for both), optionally
one TensorRT engine per group, and `manifest.json`, which records every file's sha256 and size.

Example (abridged)::

    {
      "format": "adpdm-build", "format_version": 1, "tool_version": "0.1.0",
      "created": "2025-01-01T00:00:00+00:00",
      "backend": "ort",                         # "trt" once engines are built
      "model": {"source": "reference", "sha256": "…", "type": "UNet2DModel",
                "sample_size": [32, 32], "in_channels": 1, "out_channels": 1,
                "conditioning": {"class_labels": {"num_classes": 10}}, "config": {…}},
      "scheduler": {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, …},
      "calibration": {"method": "adpdm", "weight_bits": 8, "act_bits": 8,
                      "num_groups": 2, "tau_star": 400, "extra": {}},
      "timestep_to_group": [1, 1, …, 0, 0],     # length = num_train_timesteps
      "weights": {"trt": "unet.weights.data", "ort": "unet.weights.data"},
      "groups": [
        {"id": 0, "timestep_ranges": [[500, 999]],
         "graphs": {"trt": "unet.g0.onnx", "ort": "unet.g0.ort.onnx"}, "engine": null},
        {"id": 1, "timestep_ranges": [[0, 499]], "graphs": {…}, "engine": null}],
      "tensorrt": null,                         # TensorrtInfo for backend "trt"
      "files": [{"path": "unet.g0.onnx", "sha256": "…", "size": 123}, …]
    }

`timestep_ranges` are inclusive `[first, last]` runs of training timesteps, derived from
`timestep_to_group` (`engines.timestep_groups.TimestepGroups`, checked to agree). Paths are relative, POSIX, inside the folder.

Key names: the `tensorrt` section keeps its historical keys "profile" (the TensorRT
optimization profile, `TensorrtInfo.optimization_profile`) and "graph_profile" (the graph
target the engines were built from, `TensorrtInfo.graph_target`); TENSORRT_KEYS maps field
names to keys, for `Manifest.to_dict` and `engines.manifest._parse_manifest` only. The
export records the calibration's graph target under its historical key
`calibration.extra["calibration_profile"]` (CALIBRATION_TARGET_EXTRA_KEY).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from engines.errors import AdpdmError
from engines.file_io import check_relpath, resolve_in
from engines.timestep_groups import TimestepGroups

FORMAT = "adpdm-build"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
BACKENDS = ("ort", "trt")
TARGETS = ("trt", "ort", "fp")  # graph targets: TensorRT Q/DQ placement, onnxruntime CPU, FP
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16")  # the float type of a target's graphs outside the INT8 layers
CONDITIONING_INPUTS = ("encoder_hidden_states", "class_labels", "text_embeds", "time_ids")
# the integer fields of each conditioning input's spec (the first one required, but for class_labels)
_SPEC_INTS = {"encoder_hidden_states": ("dim", "sequence_length"), "class_labels": ("num_classes",),
              "text_embeds": ("dim",), "time_ids": ("dim",)}
ENGINE_NAME = "unet.g{k}.plan"
TIMING_CACHE_NAME = "timing.cache"
# TensorrtInfo field -> its key in manifest.json (historical names, kept so old and new
# manifests read the same everywhere)
TENSORRT_KEYS = {"optimization_profile": "profile", "graph_target": "graph_profile"}
# calibration.extra key of the calibration's graph target (historical name)
CALIBRATION_TARGET_EXTRA_KEY = "calibration_profile"


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("adpdm-export")
    except Exception:  # not installed (source checkout without pip install -e)
        return "0+unknown"



@dataclass
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass
class ModelInfo:
    source: str
    sha256: str
    type: str  # "UNet2DModel" | "UNet2DConditionModel"
    sample_size: tuple[int, int]  # (H, W)
    in_channels: int
    out_channels: int
    # name -> spec: {"encoder_hidden_states": {"dim": D[, "sequence_length": S]},
    #                "class_labels": {"num_classes": N},
    #                SDXL layout (diffusers' added_cond_kwargs, flat): "text_embeds": {"dim": P},
    #                "time_ids": {"dim": 6[, "default": [orig h, orig w, crop top, crop left, target h, target w]]}}
    conditioning: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the diffusers UNet config, for `as_unet()`


@dataclass
class CalibrationSummary:
    method: str
    weight_bits: int
    act_bits: int
    num_groups: int
    tau_star: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupEntry:
    id: int
    timestep_ranges: list[tuple[int, int]]  # inclusive [first, last] runs
    graphs: dict[str, str]  # graph target -> graph file
    engine: Optional[str] = None  # TensorRT engine file (backend "trt")


@dataclass
class TrtOptimizationProfile:
    """One TensorRT optimization profile: (min, opt, max) per dynamic dimension."""

    batch: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    sequence_length: Optional[int] = None  # encoder_hidden_states (fixed)


@dataclass
class TensorrtInfo:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    optimization_profile: TrtOptimizationProfile  # on disk: "profile"
    batch_sizes: list[int]
    opt_level: int
    graph_target: str = "trt"  # which group graphs the engines were built from; on disk: "graph_profile"
    timing_cache: Optional[str] = None
    strongly_typed: bool = True


@dataclass
class OrtOneSessionInfo:
    """The CPU target's groups as ONE onnxruntime session (engines/ort_one_session.py): the shared
    graph (optimized once, group constants as inputs), its own weights file (the weights onnxruntime
    rewrote; the rest stay in the group graphs' weights file), the per-group constants, and the
    onnxruntime version and CPU architecture that optimized the graph. Optional: manifests without it
    (older builds) run per-group sessions."""

    graph: str
    weights: str
    constants: str
    num_inputs: int  # group constants fed as graph inputs
    onnxruntime: str
    machine: str
    optimization: str = "extended"

    @staticmethod
    def from_dict(d: Any) -> "OrtOneSessionInfo":
        if not isinstance(d, Mapping):
            raise AdpdmError(f"manifest: ort_one_session must be an object, got {type(d).__name__}")
        out = {}
        for k in ("graph", "weights", "constants", "onnxruntime", "machine", "optimization"):
            v = d.get(k, "extended" if k == "optimization" else None)
            if not isinstance(v, str):
                raise AdpdmError(f"manifest: ort_one_session.{k} must be a string, got {type(v).__name__}")
            out[k] = v
        n = d.get("num_inputs")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise AdpdmError("manifest: ort_one_session.num_inputs must be an integer >= 0")
        return OrtOneSessionInfo(num_inputs=n, **out)


@dataclass
class Manifest:
    model: ModelInfo
    scheduler: dict[str, Any]
    calibration: CalibrationSummary
    timestep_to_group: list[int]
    groups: list[GroupEntry]
    weights: dict[str, str]  # graph target -> external weights file
    backend: str = "ort"
    tensorrt: Optional[TensorrtInfo] = None
    files: list[FileEntry] = field(default_factory=list)
    ort_one_session: Optional[OrtOneSessionInfo] = None  # absent in manifests before issue 16
    # graph target -> the float type outside the INT8 layers ("fp32", "fp16", "bf16"); the graphs' inputs
    # and output are float32 in every precision. Absent in manifests before issue 15 (all FP32).
    graph_precision: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tool_version: str = field(default_factory=tool_version)
    created: str = ""
    root: Optional[Path] = field(default=None, compare=False, repr=False)  # set by load_manifest

    # -- derived -----------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.timestep_to_group)

    @property
    def timestep_groups(self) -> TimestepGroups:
        """`timestep_to_group` as the grouping value type (the manifest must be valid)."""
        return TimestepGroups(self.timestep_to_group, len(self.groups))

    def targets(self) -> list[str]:
        """Graph targets every group has, in TARGETS order."""
        have = set.intersection(*(set(g.graphs) for g in self.groups)) if self.groups else set()
        return [p for p in TARGETS if p in have]

    def referenced_files(self) -> list[str]:
        names: list[str] = []
        for g in self.groups:
            names += list(g.graphs.values())
            if g.engine:
                names.append(g.engine)
        names += list(self.weights.values())
        if self.tensorrt and self.tensorrt.timing_cache:
            names.append(self.tensorrt.timing_cache)
        if self.ort_one_session:
            o = self.ort_one_session
            names += [o.graph, o.weights, o.constants]
        return list(dict.fromkeys(names))

    def path(self, name: str) -> Path:
        if self.root is None:
            raise AdpdmError("this manifest was not loaded from a build folder")
        return resolve_in(self.root, name)

    def graph_paths(self, target: str) -> list[Path]:
        missing = [g.id for g in self.groups if target not in g.graphs]
        if missing:
            raise AdpdmError(
                f"the build has no {target!r} graph for group(s) {missing}; targets present: {self.targets()}"
            )
        return [self.path(g.graphs[target]) for g in self.groups]

    def engine_paths(self) -> list[Path]:
        if self.backend != "trt" or any(not g.engine for g in self.groups):
            raise AdpdmError("this build has no TensorRT engines: run `adpdm build-engine` with --backend trt")
        return [self.path(g.engine) for g in self.groups]  # type: ignore[arg-type]

    # -- (de)serialization ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root", None)
        out = {"format": FORMAT, "format_version": d.pop("format_version"), "tool_version": d.pop("tool_version")}
        out["created"] = d.pop("created")
        out["backend"] = d.pop("backend")
        out.update(d)
        if out.get("ort_one_session") is None:  # absent rather than null: older readers see the same keys
            out.pop("ort_one_session", None)
        if not out.get("graph_precision"):
            out.pop("graph_precision", None)
        if out.get("tensorrt") is not None:  # field names -> the historical keys, in place
            out["tensorrt"] = {TENSORRT_KEYS.get(k, k): v for k, v in out["tensorrt"].items()}
        return _jsonable(out)

    def validate(self) -> "Manifest":
        """Check internal consistency (raises AdpdmError); returns self."""
        validate_manifest(self)
        return self


def make_groups(
    table: Sequence[int], graphs: Mapping[str, Sequence[str]], engines: Optional[Sequence[str]] = None
) -> list[GroupEntry]:
    """GroupEntry list from the table and per-target graph lists (`graphs[target][k]`)."""
    runs = TimestepGroups(table).ranges()
    return [
        GroupEntry(
            id=k,
            timestep_ranges=runs[k],
            graphs={p: names[k] for p, names in graphs.items()},
            engine=engines[k] if engines else None,
        )
        for k in range(len(runs))
    ]


def validate_manifest(m: Manifest) -> None:
    """Check a manifest's internal consistency: AdpdmError naming the first problem."""
    if m.backend not in BACKENDS:
        raise AdpdmError(f"manifest: backend must be one of {BACKENDS}, got {m.backend!r}")
    mi = m.model
    if len(mi.sample_size) != 2 or min(mi.sample_size) < 1:
        raise AdpdmError(f"manifest: model.sample_size must be [H, W] >= 1, got {list(mi.sample_size)}")
    unknown = set(mi.conditioning) - set(CONDITIONING_INPUTS)
    if unknown:
        raise AdpdmError(f"manifest: unknown conditioning input(s) {sorted(unknown)}; known: {CONDITIONING_INPUTS}")
    for name, spec in mi.conditioning.items():
        keys = _SPEC_INTS[name]
        if not isinstance(spec, dict) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 1 for k, v in spec.items() if k in keys
        ):
            raise AdpdmError(f"manifest: model.conditioning.{name} must hold positive integers {keys}, got {spec!r}")
        if name != "class_labels" and keys[0] not in spec:  # class labels: the count is optional
            raise AdpdmError(f"manifest: model.conditioning.{name} needs {keys[0]!r}")
    added = [n for n in ("text_embeds", "time_ids") if n in mi.conditioning]
    if added and (len(added) != 2 or "encoder_hidden_states" not in mi.conditioning):
        raise AdpdmError("manifest: model.conditioning: text_embeds and time_ids (SDXL added conditions) go together, "
                         "with encoder_hidden_states")
    default = mi.conditioning.get("time_ids", {}).get("default")
    if default is not None and (not isinstance(default, list) or len(default) != mi.conditioning["time_ids"]["dim"]
                                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in default)):
        raise AdpdmError(f"manifest: model.conditioning.time_ids.default must be {mi.conditioning['time_ids']['dim']} "
                         f"numbers, got {default!r}")
    T = m.scheduler.get("num_train_timesteps", 1000)  # diffusers' default, as engines.scheduling
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise AdpdmError(f"manifest: scheduler.num_train_timesteps must be a positive integer, got {T!r}")
    table = m.timestep_to_group
    if len(table) != T:
        raise AdpdmError(
            f"manifest: timestep_to_group has {len(table)} entries, the scheduler has {T} training timesteps"
        )
    G = len(m.groups)
    if G < 1:
        raise AdpdmError("manifest: no groups")
    if [g.id for g in m.groups] != list(range(G)):
        raise AdpdmError(f"manifest: group ids must be 0..{G - 1} in order, got {[g.id for g in m.groups]}")
    if m.calibration.num_groups != G:
        raise AdpdmError(f"manifest: calibration.num_groups = {m.calibration.num_groups} but {G} groups are listed")
    bad = sorted({k for k in table if not 0 <= k < G})
    if bad:
        raise AdpdmError(f"manifest: timestep_to_group names group(s) {bad} that do not exist (0..{G - 1})")
    runs = TimestepGroups(table, G).ranges()
    for g in m.groups:
        if [tuple(x) for x in g.timestep_ranges] != runs[g.id]:
            raise AdpdmError(
                f"manifest: groups[{g.id}].timestep_ranges {g.timestep_ranges} disagree with timestep_to_group "
                f"({runs[g.id]})"
            )
        if not g.graphs:
            raise AdpdmError(f"manifest: group {g.id} lists no graph")
        for p, name in g.graphs.items():
            if p not in TARGETS:
                raise AdpdmError(f"manifest: group {g.id} has unknown graph target {p!r} (known: {TARGETS})")
            check_relpath(name, f"graph of group {g.id}")
        if g.engine is not None:
            check_relpath(g.engine, f"engine of group {g.id}")
    for p, name in m.weights.items():
        if p not in TARGETS:
            raise AdpdmError(f"manifest: weights for unknown graph target {p!r}")
        check_relpath(name, f"weights file ({p})")
    if m.backend == "trt":
        if m.tensorrt is None:
            raise AdpdmError("manifest: backend 'trt' needs the 'tensorrt' section")
        if any(not g.engine for g in m.groups):
            raise AdpdmError("manifest: backend 'trt' needs an engine file for every group")
        t = m.tensorrt
        op = t.optimization_profile
        for dim, (lo, opt, hi) in (("batch", op.batch), ("height", op.height), ("width", op.width)):
            if not 1 <= lo <= opt <= hi:
                raise AdpdmError(f"manifest: tensorrt.profile.{dim} needs 1 <= min <= opt <= max, got {[lo, opt, hi]}")
        if t.timing_cache is not None:
            check_relpath(t.timing_cache, "timing cache")
    for p, prec in m.graph_precision.items():
        if p not in TARGETS or prec not in GRAPH_PRECISIONS:
            raise AdpdmError(f"manifest: graph_precision must map graph targets {TARGETS} to one of {GRAPH_PRECISIONS}, "
                             f"got {p!r}: {prec!r}")
    if m.ort_one_session is not None:
        o = m.ort_one_session
        if "ort" not in m.targets():
            raise AdpdmError("manifest: ort_one_session needs the CPU-target ('ort') graphs")
        for what, name in (("graph", o.graph), ("weights", o.weights), ("constants", o.constants)):
            check_relpath(name, f"ort_one_session.{what}")
    listed = {f.path for f in m.files}
    for f in m.files:
        check_relpath(f.path, "file")
        if len(f.sha256) != 64 or any(c not in "0123456789abcdef" for c in f.sha256):
            raise AdpdmError(f"manifest: files entry {f.path!r} has no valid sha256")
    if m.files:  # a manifest being assembled (before write_manifest) has no files yet
        unlisted = [n for n in m.referenced_files() if n not in listed]
        if unlisted:
            raise AdpdmError(f"manifest: file(s) {unlisted} are used by the build but have no sha256/size record")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def with_tensorrt(m: Manifest, info: TensorrtInfo, engines: Sequence[str]) -> Manifest:
    """A copy of `m` describing a TensorRT build (engines per group)."""
    groups = [replace(g, engine=e) for g, e in zip(m.groups, engines)]
    return replace(m, backend="trt", tensorrt=info, groups=groups, files=[], created="")


def without_tensorrt(m: Manifest) -> Manifest:
    """A copy of `m` describing only its ONNX graphs (backend "ort")."""
    groups = [replace(g, engine=None) for g in m.groups]
    return replace(m, backend="ort", tensorrt=None, groups=groups, files=[], created="")
