"""`manifest.json`: the contract between a build folder and everything that loads it.

A build folder holds one ONNX graph per (timestep group, profile), one external weights
file per profile (possibly the same file for both), optionally one TensorRT engine per
group, and `manifest.json`, written LAST and atomically (temporary file + `os.replace`).
The manifest records every file's sha256 and size; `load_manifest(dir)` validates the
schema and, with `verify=True`, checks each file against its record, so a missing,
truncated or tampered file, an unknown format version, or a path that leaves the folder
is a clear `AdpdmError`, never a crash deep inside onnxruntime or TensorRT.

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
`timestep_to_group` (checked to agree). Paths are relative, POSIX, inside the folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping, Optional, Sequence

from engines.errors import AdpdmError

FORMAT = "adpdm-build"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
BACKENDS = ("ort", "trt")
PROFILES = ("trt", "ort", "fp")
CONDITIONING_INPUTS = ("encoder_hidden_states", "class_labels")
ENGINE_NAME = "unet.g{k}.plan"
TIMING_CACHE_NAME = "timing.cache"


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("adpdm-export")
    except Exception:  # not installed (source checkout without pip install -e)
        return "0+unknown"


def check_relpath(name: Any, what: str = "path") -> str:
    """A manifest path must be a relative POSIX path that stays inside the build folder."""
    if not isinstance(name, str) or not name or name.strip() != name:
        raise AdpdmError(f"manifest {what} {name!r} is not a file name")
    if "\\" in name or "\x00" in name:
        raise AdpdmError(f"manifest {what} {name!r} must be a POSIX path relative to the build folder")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise AdpdmError(f"manifest {what} {name!r} is absolute: paths must stay inside the build folder")
    if any(p in ("..", ".", "") for p in name.split("/")):
        raise AdpdmError(f"manifest {what} {name!r} leaves the build folder (or is not a plain path)")
    return name


def resolve_in(root: Path, name: str, what: str = "path") -> Path:
    """`root / name`, refusing names (or symbolic links) that lead out of `root`."""
    check_relpath(name, what)
    root_r = Path(root).resolve()
    p = (root_r / name).resolve()
    if not p.is_relative_to(root_r):
        raise AdpdmError(f"manifest {what} {name!r} resolves outside the build folder ({p})")
    return p


@dataclass
class FileEntry:
    path: str
    sha256: str
    size: int


def file_entry(root: str | os.PathLike, name: str) -> FileEntry:
    p = resolve_in(Path(root), name)
    if not p.is_file():
        raise AdpdmError(f"cannot record {name!r} in the manifest: no such file in {root}")
    return FileEntry(path=name, sha256=sha256_file(p), size=p.stat().st_size)


# --------------------------------------------------------------------------- schema


@dataclass
class ModelInfo:
    source: str
    sha256: str
    type: str  # "UNet2DModel" | "UNet2DConditionModel"
    sample_size: tuple[int, int]  # (H, W)
    in_channels: int
    out_channels: int
    # name -> spec: {"encoder_hidden_states": {"dim": D[, "sequence_length": S]},
    #                "class_labels": {"num_classes": N}}
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
    graphs: dict[str, str]  # profile -> graph file
    engine: Optional[str] = None  # TensorRT engine file (backend "trt")


@dataclass
class TrtProfile:
    """One optimization profile: (min, opt, max) per dynamic dimension."""

    batch: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    sequence_length: Optional[int] = None  # encoder_hidden_states (fixed)


@dataclass
class TensorrtInfo:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    profile: TrtProfile
    batch_sizes: list[int]
    opt_level: int
    graph_profile: str = "trt"  # which group graphs the engines were built from
    timing_cache: Optional[str] = None
    strongly_typed: bool = True


@dataclass
class Manifest:
    model: ModelInfo
    scheduler: dict[str, Any]
    calibration: CalibrationSummary
    timestep_to_group: list[int]
    groups: list[GroupEntry]
    weights: dict[str, str]  # profile -> external weights file
    backend: str = "ort"
    tensorrt: Optional[TensorrtInfo] = None
    files: list[FileEntry] = field(default_factory=list)
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

    def profiles(self) -> list[str]:
        """Graph profiles every group has, in PROFILES order."""
        have = set.intersection(*(set(g.graphs) for g in self.groups)) if self.groups else set()
        return [p for p in PROFILES if p in have]

    def referenced_files(self) -> list[str]:
        names: list[str] = []
        for g in self.groups:
            names += list(g.graphs.values())
            if g.engine:
                names.append(g.engine)
        names += list(self.weights.values())
        if self.tensorrt and self.tensorrt.timing_cache:
            names.append(self.tensorrt.timing_cache)
        return list(dict.fromkeys(names))

    def path(self, name: str) -> Path:
        if self.root is None:
            raise AdpdmError("this manifest was not loaded from a build folder")
        return resolve_in(self.root, name)

    def graph_paths(self, profile: str) -> list[Path]:
        missing = [g.id for g in self.groups if profile not in g.graphs]
        if missing:
            raise AdpdmError(
                f"the build has no {profile!r} graph for group(s) {missing}; profiles present: {self.profiles()}"
            )
        return [self.path(g.graphs[profile]) for g in self.groups]

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
        return _jsonable(out)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        return _parse_manifest(d)

    def validate(self) -> "Manifest":
        """Check internal consistency (raises AdpdmError); returns self."""
        _validate(self)
        return self


def ranges_from_table(table: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
    """Inclusive [first, last] runs of equal group id in the t -> group table."""
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for t in range(1, len(table) + 1):
        if t == len(table) or table[t] != table[start]:
            runs.setdefault(int(table[start]), []).append((start, t - 1))
            start = t
    return runs


def make_groups(
    table: Sequence[int], graphs: Mapping[str, Sequence[str]], engines: Optional[Sequence[str]] = None
) -> list[GroupEntry]:
    """GroupEntry list from the table and per-profile graph lists (`graphs[profile][k]`)."""
    n = max(table) + 1 if len(table) else 0
    runs = ranges_from_table(table)
    return [
        GroupEntry(
            id=k,
            timestep_ranges=runs.get(k, []),
            graphs={p: names[k] for p, names in graphs.items()},
            engine=engines[k] if engines else None,
        )
        for k in range(n)
    ]


# --------------------------------------------------------------------------- write / load


def write_manifest(
    build_dir: str | os.PathLike, manifest: Manifest, extra_files: Iterable[str] = ()
) -> Path:
    """Hash every referenced file (+ `extra_files`), validate, and write manifest.json atomically.

    Call it LAST, after every other file of the build is in place: a folder without a
    manifest (or with a stale one deleted first) is an unfinished build.
    """
    root = Path(build_dir)
    names = list(dict.fromkeys([*manifest.referenced_files(), *extra_files]))
    manifest.files = [file_entry(root, n) for n in names]
    if not manifest.created:
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest.format_version = FORMAT_VERSION
    _validate(manifest)
    path = atomic_write_text(root / MANIFEST_NAME, dumps_readable(manifest.to_dict()) + "\n")
    manifest.root = root.resolve()
    return path


def load_manifest(build_dir: str | os.PathLike, verify: bool | str = True) -> Manifest:
    """Read and validate `build_dir/manifest.json`.

    verify: True checks every recorded file's size and sha256; "size" checks presence and
    size only (fast, for large builds already verified once); False checks nothing on disk.
    """
    root = Path(build_dir)
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        hint = " (unfinished or interrupted build?)" if root.is_dir() else ""
        raise AdpdmError(f"no {MANIFEST_NAME} in {root}{hint}: not an adpdm build folder")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdpdmError(f"{mpath} is not valid JSON ({e}): the manifest is damaged, rebuild") from None
    if not isinstance(raw, dict):
        raise AdpdmError(f"{mpath}: the manifest must be a JSON object")
    m = _parse_manifest(raw, where=str(mpath))
    m.root = root.resolve()
    for fe in m.files:
        resolve_in(m.root, fe.path, "file")
    if verify:
        verify_files(m, hashes=(verify is True))
    return m


def verify_files(manifest: Manifest, hashes: bool = True) -> None:
    """Every recorded file present with its recorded size (and sha256): else AdpdmError."""
    root = manifest.root
    if root is None:
        raise AdpdmError("verify_files needs a manifest loaded from a build folder")
    for fe in manifest.files:
        p = resolve_in(root, fe.path, "file")
        if not p.is_file():
            raise AdpdmError(f"build file {fe.path} is missing from {root}: rebuild, or restore the file")
        size = p.stat().st_size
        if size != fe.size:
            kind = "truncated" if size < fe.size else "larger than recorded"
            raise AdpdmError(
                f"build file {fe.path} is {kind} ({size} bytes, the manifest records {fe.size}): rebuild"
            )
        if hashes and sha256_file(p) != fe.sha256:
            raise AdpdmError(
                f"build file {fe.path} does not match its sha256 in the manifest (modified or corrupt): rebuild"
            )


# --------------------------------------------------------------------------- parsing


class _Reader:
    def __init__(self, d: Any, where: str):
        if not isinstance(d, Mapping):
            raise AdpdmError(f"manifest: {where} must be an object, got {type(d).__name__}")
        self.d, self.where = d, where

    def get(self, key: str, kind, optional: bool = False, default: Any = None):
        if key not in self.d or self.d[key] is None:
            if optional:
                return default
            raise AdpdmError(f"manifest: {self.where}.{key} is missing")
        v = self.d[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool in kinds or not isinstance(v, bool):  # bool is an int subclass: only accept it where asked
            if isinstance(v, kinds):
                return v
        raise AdpdmError(
            f"manifest: {self.where}.{key} must be {'/'.join(k.__name__ for k in kinds)}, got {type(v).__name__}"
        )

    def int_(self, key: str, optional: bool = False, default: Any = None, minimum: Optional[int] = None):
        v = self.get(key, int, optional, default)
        if v is not None and minimum is not None and v < minimum:
            raise AdpdmError(f"manifest: {self.where}.{key} must be >= {minimum}, got {v}")
        return v

    def int_list(self, key: str, length: Optional[int] = None) -> list[int]:
        v = self.get(key, list)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise AdpdmError(f"manifest: {self.where}.{key} must be a list of integers")
        if length is not None and len(v) != length:
            raise AdpdmError(f"manifest: {self.where}.{key} must have {length} entries, got {len(v)}")
        return list(v)

    def str_map(self, key: str) -> dict[str, str]:
        v = self.get(key, dict)
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise AdpdmError(f"manifest: {self.where}.{key} must map names to file names")
        return dict(v)


def _parse_manifest(d: Mapping[str, Any], where: str = "manifest") -> Manifest:
    r = _Reader(d, "manifest")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise AdpdmError(f"{where} is not an adpdm build manifest (format {fmt!r}, expected {FORMAT!r})")
    version = d.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise AdpdmError(
            f"{where} has format version {version!r}; this adpdm-export ({tool_version()}) reads version(s) "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}: upgrade adpdm-export or rebuild the folder"
        )

    mr = _Reader(r.get("model", dict), "model")
    sample_size = mr.int_list("sample_size", 2)
    model = ModelInfo(
        source=mr.get("source", str),
        sha256=mr.get("sha256", str),
        type=mr.get("type", str),
        sample_size=(sample_size[0], sample_size[1]),
        in_channels=mr.int_("in_channels", minimum=1),
        out_channels=mr.int_("out_channels", minimum=1),
        conditioning={k: dict(v) for k, v in mr.get("conditioning", dict, True, {}).items()},
        config=dict(mr.get("config", dict, True, {})),
    )
    cr = _Reader(r.get("calibration", dict), "calibration")
    calib = CalibrationSummary(
        method=cr.get("method", str),
        weight_bits=cr.int_("weight_bits", minimum=1),
        act_bits=cr.int_("act_bits", minimum=1),
        num_groups=cr.int_("num_groups", minimum=1),
        tau_star=cr.int_("tau_star", optional=True),
        extra=dict(cr.get("extra", dict, True, {})),
    )
    groups = []
    raw_groups = r.get("groups", list)
    for i, g in enumerate(raw_groups):
        gr = _Reader(g, f"groups[{i}]")
        ranges = gr.get("timestep_ranges", list)
        if not all(
            isinstance(x, list) and len(x) == 2 and all(isinstance(y, int) and not isinstance(y, bool) for y in x)
            for x in ranges
        ):
            raise AdpdmError(f"manifest: groups[{i}].timestep_ranges must be a list of [first, last] pairs")
        groups.append(
            GroupEntry(
                id=gr.int_("id", minimum=0),
                timestep_ranges=[(a, b) for a, b in ranges],
                graphs=gr.str_map("graphs"),
                engine=gr.get("engine", str, optional=True),
            )
        )
    trt = None
    if d.get("tensorrt") is not None:
        tr = _Reader(r.get("tensorrt", dict), "tensorrt")
        pr = _Reader(tr.get("profile", dict), "tensorrt.profile")
        trt = TensorrtInfo(
            tensorrt_version=tr.get("tensorrt_version", str),
            gpu_name=tr.get("gpu_name", str),
            compute_capability=tr.get("compute_capability", str),
            profile=TrtProfile(
                batch=tuple(pr.int_list("batch", 3)),  # type: ignore[arg-type]
                height=tuple(pr.int_list("height", 3)),  # type: ignore[arg-type]
                width=tuple(pr.int_list("width", 3)),  # type: ignore[arg-type]
                sequence_length=pr.int_("sequence_length", optional=True, minimum=1),
            ),
            batch_sizes=tr.int_list("batch_sizes"),
            opt_level=tr.int_("opt_level", minimum=0),
            graph_profile=tr.get("graph_profile", str, True, "trt"),
            timing_cache=tr.get("timing_cache", str, optional=True),
            strongly_typed=tr.get("strongly_typed", bool, True, True),
        )
    files = []
    for i, f in enumerate(r.get("files", list)):
        fr = _Reader(f, f"files[{i}]")
        files.append(FileEntry(path=fr.get("path", str), sha256=fr.get("sha256", str), size=fr.int_("size", minimum=0)))
    m = Manifest(
        model=model,
        scheduler=dict(r.get("scheduler", dict)),
        calibration=calib,
        timestep_to_group=r.int_list("timestep_to_group"),
        groups=groups,
        weights=r.str_map("weights"),
        backend=r.get("backend", str),
        tensorrt=trt,
        files=files,
        format_version=version,
        tool_version=r.get("tool_version", str),
        created=r.get("created", str, True, ""),
    )
    _validate(m)
    return m


def _validate(m: Manifest) -> None:
    if m.backend not in BACKENDS:
        raise AdpdmError(f"manifest: backend must be one of {BACKENDS}, got {m.backend!r}")
    mi = m.model
    if len(mi.sample_size) != 2 or min(mi.sample_size) < 1:
        raise AdpdmError(f"manifest: model.sample_size must be [H, W] >= 1, got {list(mi.sample_size)}")
    unknown = set(mi.conditioning) - set(CONDITIONING_INPUTS)
    if unknown:
        raise AdpdmError(f"manifest: unknown conditioning input(s) {sorted(unknown)}; known: {CONDITIONING_INPUTS}")
    for name, spec in mi.conditioning.items():
        keys = {"encoder_hidden_states": ("dim", "sequence_length"), "class_labels": ("num_classes",)}[name]
        if not isinstance(spec, dict) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 1 for k, v in spec.items() if k in keys
        ):
            raise AdpdmError(f"manifest: model.conditioning.{name} must hold positive integers {keys}, got {spec!r}")
        if name == "encoder_hidden_states" and "dim" not in spec:
            raise AdpdmError("manifest: model.conditioning.encoder_hidden_states needs 'dim'")
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
    runs = ranges_from_table(table)
    for g in m.groups:
        if [tuple(x) for x in g.timestep_ranges] != runs.get(g.id, []):
            raise AdpdmError(
                f"manifest: groups[{g.id}].timestep_ranges {g.timestep_ranges} disagree with timestep_to_group "
                f"({runs.get(g.id, [])})"
            )
        if not g.graphs:
            raise AdpdmError(f"manifest: group {g.id} lists no graph")
        for p, name in g.graphs.items():
            if p not in PROFILES:
                raise AdpdmError(f"manifest: group {g.id} has unknown graph profile {p!r} (known: {PROFILES})")
            check_relpath(name, f"graph of group {g.id}")
        if g.engine is not None:
            check_relpath(g.engine, f"engine of group {g.id}")
    for p, name in m.weights.items():
        if p not in PROFILES:
            raise AdpdmError(f"manifest: weights for unknown profile {p!r}")
        check_relpath(name, f"weights file ({p})")
    if m.backend == "trt":
        if m.tensorrt is None:
            raise AdpdmError("manifest: backend 'trt' needs the 'tensorrt' section")
        if any(not g.engine for g in m.groups):
            raise AdpdmError("manifest: backend 'trt' needs an engine file for every group")
        t = m.tensorrt
        for dim, (lo, opt, hi) in (("batch", t.profile.batch), ("height", t.profile.height), ("width", t.profile.width)):
            if not 1 <= lo <= opt <= hi:
                raise AdpdmError(f"manifest: tensorrt.profile.{dim} needs 1 <= min <= opt <= max, got {[lo, opt, hi]}")
        if t.timing_cache is not None:
            check_relpath(t.timing_cache, "timing cache")
    listed = {f.path for f in m.files}
    for f in m.files:
        check_relpath(f.path, "file")
        if len(f.sha256) != 64 or any(c not in "0123456789abcdef" for c in f.sha256):
            raise AdpdmError(f"manifest: files entry {f.path!r} has no valid sha256")
    if m.files:  # a manifest being assembled (before write_manifest) has no files yet
        unlisted = [n for n in m.referenced_files() if n not in listed]
        if unlisted:
            raise AdpdmError(f"manifest: file(s) {unlisted} are used by the build but have no sha256/size record")


def dumps_readable(x: Any, indent: int = 0) -> str:
    """JSON with one key per line, but lists of scalars (the 1000-entry table) on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(x, dict) and x:
        items = [f"{inner}{json.dumps(k)}: {dumps_readable(v, indent + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, list) and x and any(isinstance(v, (dict, list)) for v in x):
        if all(isinstance(v, list) and not any(isinstance(w, (dict, list)) for w in v) for v in x):
            return json.dumps(x)  # list of pairs (timestep ranges)
        return "[\n" + ",\n".join(inner + dumps_readable(v, indent + 1) for v in x) + "\n" + pad + "]"
    return json.dumps(x)


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
