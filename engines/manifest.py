"""Reading and writing `manifest.json` (its schema: engines/manifest_schema.py).

`write_manifest` is called LAST in a build, after every other file is in place, and writes
atomically, so a folder without a manifest is an unfinished build. `load_manifest(dir)`
validates the schema and, with `verify=True`, checks each recorded file's size and sha256,
so a missing, truncated or tampered file, an unknown format version, or a path that leaves
the folder is a clear `AdpdmError`, never a crash deep inside onnxruntime or TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from engines.errors import AdpdmError
from engines.group_graph_stamp import check_graph_stamps
from engines.json_files import JsonFields, read_json
from engines.file_io import atomic_write_text, resolve_in, sha256_file
from engines.manifest_schema import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SUPPORTED_FORMAT_VERSIONS,
    TENSORRT_KEYS,
    CalibrationSummary,
    FileEntry,
    GroupEntry,
    Manifest,
    ModelInfo,
    OrtOneSessionInfo,
    TensorrtInfo,
    TrtOptimizationProfile,
    tool_version,
    validate_manifest,
)


def file_entry(root: str | os.PathLike, name: str) -> FileEntry:
    p = resolve_in(Path(root), name)
    if not p.is_file():
        raise AdpdmError(f"cannot record {name!r} in the manifest: no such file in {root}")
    return FileEntry(path=name, sha256=sha256_file(p), size=p.stat().st_size)



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
    validate_manifest(manifest)
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
    raw = read_json(mpath, "the build manifest")  # damaged, nested too deep, not an object: one line
    m = _parse_manifest(raw, where=str(mpath))
    m.root = root.resolve()
    for fe in m.files:
        resolve_in(m.root, fe.path, "file")
    if verify:
        verify_files(m, hashes=(verify is True))
        check_graph_stamps(m)  # the manifest's table, sample size and channels are the graphs' own
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


def _Reader(d: Any, where: str) -> JsonFields:
    """Typed fields of the manifest; errors read "manifest: model.in_channels must be integer, ..."."""
    return JsonFields(d, where, prefix="manifest: ")


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
        key = TENSORRT_KEYS  # field name -> its historical key in the file
        op_key = key["optimization_profile"]
        pr = _Reader(tr.get(op_key, dict), f"tensorrt.{op_key}")
        trt = TensorrtInfo(
            tensorrt_version=tr.get("tensorrt_version", str),
            gpu_name=tr.get("gpu_name", str),
            compute_capability=tr.get("compute_capability", str),
            optimization_profile=TrtOptimizationProfile(
                batch=tuple(pr.int_list("batch", 3)),  # type: ignore[arg-type]
                height=tuple(pr.int_list("height", 3)),  # type: ignore[arg-type]
                width=tuple(pr.int_list("width", 3)),  # type: ignore[arg-type]
                sequence_length=pr.int_("sequence_length", optional=True, minimum=1),
            ),
            batch_sizes=tr.int_list("batch_sizes"),
            opt_level=tr.int_("opt_level", minimum=0),
            graph_target=tr.get(key["graph_target"], str, True, "trt"),
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
        ort_one_session=None if d.get("ort_one_session") is None else OrtOneSessionInfo.from_dict(d["ort_one_session"]),
        graph_precision=r.str_map("graph_precision") if "graph_precision" in d else {},
    )
    validate_manifest(m)
    return m


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
