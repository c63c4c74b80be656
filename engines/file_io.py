"""Hashing and atomic writes: the one place the project hashes files and settings and replaces files.

Every file that something else trusts later (a build's graphs and manifest, a calibration,
a trajectory or statistics cache, the stage ledger) is written through `atomic_write`: a
temporary file beside the target, fsynced, then renamed over it, so a reader sees the old
file or the new one, never half of one. `sha256_json` is the content key of settings
(sorted keys), so a cache key does not depend on dict order. `check_relpath` / `resolve_in`
keep the paths a manifest names inside its build folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Optional

from engines.errors import AdpdmError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any, default: Optional[Callable[[Any], Any]] = None) -> str:
    """sha256 (hex) of `json.dumps(obj, sort_keys=True, default=default)`: a content key of settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], mode: int = 0o644) -> Path:
    """Have `write(tmp)` fill a temporary file beside `path`, fsync it, then rename it into place.

    `write` gets the temporary file's name (for writers that open the file themselves, such
    as safetensors' `save_file`); on any failure the temporary file is removed and `path`
    keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


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


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` can be (or already is) a folder we write into: not a file, not below a file, and its
    first existing ancestor writable. One AdpdmError line before any work, instead of an OSError
    after it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdpdmError(f"{flag} {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise AdpdmError(f"{flag} {path}: {probe} is a dangling symlink")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise AdpdmError(f"{flag} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise AdpdmError(f"{flag} {path}: {probe} is not writable")
    return path
