"""Resumable stages of `build-engine`: a stage is skipped when its recorded key and outputs still match.

Each stage has a key (sha256 of its settings and of its inputs' contents: tensors by
dtype, shape and bytes, files by their hashes) and a set of output files; the ledger
`.adpdm-stages.json` in the build folder records both, with every output's sha256, after
the stage finishes. An interrupted build reruns only the stages whose record is missing,
whose settings or inputs changed or whose outputs were deleted or altered.

Ownership (`check_build_folder`, `StageLedger.claim`): `build-engine --out DIR` writes
only into a missing or empty DIR or into one of our builds, and inside a build it removes
or overwrites only files that the ledger or the manifest lists (a stage's outputs are
claimed in the ledger before it runs, so an interrupted build still owns them). Two
builds never share a folder: `build_lock` holds an fcntl lock on `.adpdm-build.lock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from engines.errors import AdpdmError
from engines.file_io import atomic_write_text, check_output_folder, sha256_file, sha256_json
from engines.manifest_schema import FORMAT as MANIFEST_FORMAT
from engines.manifest_schema import MANIFEST_NAME

LEDGER = ".adpdm-stages.json"
LOCK_NAME = ".adpdm-build.lock"
# export staging folders (qdq_export._stage_dir): tempfile.mkdtemp names, 8 characters of [a-z0-9_]
STAGING_PREFIX = ".qdq-staging-"
STAGING_RE = re.compile(r"^\.qdq-staging-[a-z0-9_]{8}$")
PENDING = "pending"  # the key of a claimed stage that has not finished: never current
OTHER = "_owned"  # ledger record of files the build owns outside any stage's current outputs


# --------------------------------------------------------------------------- which folders are ours


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def _is_control(entry: Path) -> bool:
    """Our own bookkeeping, which does not make a folder non-empty: the lock file, export staging folders."""
    return entry.name == LOCK_NAME or bool(STAGING_RE.match(entry.name))


def _ledger_records(root: Path) -> Optional[dict[str, Any]]:
    """The ledger as a JSON object of stage records, or None when there is none or it is not ours."""
    raw = _read_json(root / LEDGER)
    if not isinstance(raw, dict) or not all(isinstance(v, dict) and "outputs" in v for v in raw.values()):
        return None
    return raw


def _manifest_doc(root: Path) -> Optional[dict[str, Any]]:
    """manifest.json as a JSON object when it is an adpdm build manifest (format "adpdm-build"), else None."""
    raw = _read_json(root / MANIFEST_NAME)
    return raw if isinstance(raw, dict) and raw.get("format") == MANIFEST_FORMAT else None


def check_build_folder(out: str | os.PathLike) -> bool:
    """The one rule for `build-engine --out`: True for one of our builds, False for a missing or empty folder.

    Ours: a folder whose `.adpdm-stages.json` is a JSON object of stage records, or whose
    `manifest.json` is a JSON object with format "adpdm-build" (and a `manifest.json` that
    is present must be ours). Empty: nothing in it but our lock file and export staging
    folders. Anything else raises AdpdmError (one line), before any work.
    """
    out = check_output_folder(out)
    if not out.exists() and not out.is_symlink():
        return False
    if not any(not _is_control(e) for e in out.iterdir()):
        return False
    has_manifest = (out / MANIFEST_NAME).exists() or (out / MANIFEST_NAME).is_symlink()
    if has_manifest and _manifest_doc(out) is None:
        raise AdpdmError(f"--out {out} holds a {MANIFEST_NAME} that is not an adpdm build manifest: "
                         "choose an empty or new folder")
    if _ledger_records(out) is not None or has_manifest:
        return True
    raise AdpdmError(f"--out {out} is not empty and holds no adpdm build ({LEDGER} or {MANIFEST_NAME}): "
                     "choose an empty or new folder")


def manifest_files(root: Path) -> dict[str, str]:
    """Files our manifest in `root` lists (relative path -> sha256), manifest.json itself excluded."""
    doc = _manifest_doc(root) or {}
    files = doc.get("files") if isinstance(doc.get("files"), list) else []
    return {f["path"]: str(f.get("sha256", "")) for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)}


# --------------------------------------------------------------------------- one build at a time

_HELD: dict[str, list] = {}  # resolved lock path -> [open file, depth]: reentrant within a process


def lock_holder(path: Path) -> str:
    """Who holds a build lock, from what it wrote into the lock file."""
    info = _read_json(path)
    if not isinstance(info, dict):
        return "another process (it has not said who yet)"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"
            f" ({info.get('command', '?')})")


@contextlib.contextmanager
def build_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold `out/.adpdm-build.lock` (fcntl.flock, non-blocking) for the duration of the block.

    A second build into the same folder fails at once with one line naming the holder
    (pid, host, start time and command line, written into the lock file). The lock is
    released on exit, on exceptions and when the process dies; the file itself stays (removing
    it would let a waiting opener lock a file nobody else sees). Reentrant within a process.
    """
    path = Path(out) / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise AdpdmError(f"cannot open the build lock {path}: {e.strerror}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise AdpdmError(f"{Path(out)} is being built by {lock_holder(path)}: wait for it to finish "
                         "or choose another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:200],
        }) + "\n")
        f.flush()
        _HELD[key] = [f, 1]
        yield path
    finally:
        _HELD.pop(key, None)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def tensor_key(t: Any) -> dict[str, Any]:
    """A torch tensor or numpy array by content: its shape and the sha256 of its dtype, shape and bytes."""
    import numpy as np
    import torch

    from calibration.trajectories import tensor_digest  # the trajectory cache's hash of a condition

    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    return {"shape": list(t.shape), "sha256": tensor_digest(t.reshape(-1))}  # reshape: 0-d tensors too


def _content(value: Any) -> Any:
    """json.dumps' fallback for stage keys: by content, never a (truncated, repr-dependent) str()."""
    import numpy as np
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tensor_key(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"stage_key cannot hash a {type(value).__name__} by content; pass its settings or hash")


def stage_key(**parts: Any) -> str:
    """A stable hash of a stage's settings and inputs (JSON, sorted keys; tensors and arrays by content)."""
    return sha256_json(parts, default=_content)


@dataclass
class StageRecord:
    name: str
    key: str
    outputs: dict[str, str]  # path relative to the build folder -> sha256
    seconds: float
    reused: bool = field(default=False, compare=False)


class StageLedger:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / LEDGER
        self.records: dict[str, StageRecord] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.records = {k: StageRecord(**v) for k, v in raw.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, TypeError, AttributeError):
                self.records = {}  # an unreadable ledger only costs a rebuild
        # a build's manifest (made by `adpdm export` too) lists files this build may replace
        self.adopted = manifest_files(self.root)

    def open(self) -> "StageLedger":
        """Mark the folder as ours before any work (an interrupted first build stays resumable):
        write the ledger if it is missing, adopting the files an existing manifest lists."""
        if not self.path.is_file():
            if self.adopted:
                self.records[OTHER] = StageRecord(OTHER, PENDING, dict(self.adopted), 0.0)
            self._save()
        return self

    def owned(self) -> set[str]:
        """Relative paths this build may remove or overwrite: what the ledger (claims included) or the
        manifest lists, and the manifest itself."""
        names = {MANIFEST_NAME, *self.adopted}
        for rec in self.records.values():
            names.update(rec.outputs)
        return names

    def claim(self, name: str, outputs: Iterable[str | os.PathLike]) -> None:
        """Before stage `name` runs: refuse if one of the files it will write exists and is not ours,
        then record them (with the stage's previous outputs) so an interrupted run still owns them."""
        rels = [self._rel(p) for p in outputs]
        owned = self.owned()
        foreign = [r for r in rels if r not in owned and ((self.root / r).exists() or (self.root / r).is_symlink())]
        if foreign:
            raise AdpdmError(f"{self.root / foreign[0]} was not written by this build and would be overwritten: "
                             "move it away or choose another --out")
        old = self.records.get(name)
        merged = {**(old.outputs if old else {}), **{r: "" for r in rels}}
        self.records[name] = StageRecord(name=name, key=PENDING, outputs=merged, seconds=0.0)
        self._save()

    def _rel(self, p: str | os.PathLike) -> str:
        p = Path(p)
        return (p.resolve().relative_to(self.root.resolve()) if p.is_absolute() else p).as_posix()

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps({k: {**asdict(v), "reused": False} for k, v in self.records.items()},
                                                indent=2))

    def current(self, name: str, key: str) -> StageRecord | None:
        """The stage's record if its key matches and every output is present and unchanged."""
        rec = self.records.get(name)
        if rec is None or rec.key != key:
            return None
        for rel, digest in rec.outputs.items():
            p = self.root / rel
            if not p.is_file() or sha256_file(p) != digest:
                return None
        return rec

    def record(self, name: str, key: str, outputs: Iterable[Path], seconds: float) -> StageRecord:
        rels = {str(Path(p).resolve().relative_to(self.root.resolve())): sha256_file(Path(p)) for p in outputs}
        rec = StageRecord(name=name, key=key, outputs=rels, seconds=seconds)
        old = self.records.get(name)
        left = {r: d for r, d in (old.outputs if old else {}).items() if r not in rels and (self.root / r).exists()}
        if left:  # files the stage wrote before (or claimed) and no longer lists, still ours to replace
            other = self.records.get(OTHER) or StageRecord(OTHER, PENDING, {}, 0.0)
            self.records[OTHER] = replace(other, outputs={**other.outputs, **left})
        self.records[name] = rec
        self._save()
        return rec

    def run(self, name: str, key: str, fn: Callable[[], Iterable[Path]], force: bool = False) -> StageRecord:
        """Run `fn` (which returns its output files) unless a current record exists."""
        if not force:
            rec = self.current(name, key)
            if rec is not None:
                rec.reused = True
                return rec
        t0 = time.perf_counter()
        outputs = list(fn())
        return self.record(name, key, outputs, time.perf_counter() - t0)


@contextlib.contextmanager
def claimed_build_folder(out: str | os.PathLike) -> Iterator[Path]:
    """`out` checked (`check_build_folder`), created and locked (`build_lock`) for the block: the one
    way `build-engine` and `export` take their `--out`. A folder this call created is removed again
    when the block fails before writing anything but the lock. Reentrant (the API inside the CLI)."""
    out = Path(out)
    check_build_folder(out)  # before any work: empty, missing or one of ours
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with build_lock(out):
            check_build_folder(out)  # again, now that no other build can change it
            yield out
    except BaseException:
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_NAME]:
            (out / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):
                out.rmdir()
        raise

