"""Resumable stages of `build-engine`: a stage is skipped when its recorded key and outputs still match.

Each stage has a key (sha256 of its settings and of its inputs' contents: tensors by
dtype, shape and bytes, files by their hashes) and a set of output files; the ledger
`.adpdm-stages.json` in the build folder records both, with every output's sha256, after
the stage finishes. An interrupted build reruns only the stages whose record is missing,
whose settings or inputs changed or whose outputs were deleted or altered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from engines.manifest import sha256_file

LEDGER = ".adpdm-stages.json"


def tensor_key(t: Any) -> dict[str, Any]:
    """A torch tensor or numpy array by content: its shape and the sha256 of its dtype, shape and bytes."""
    import numpy as np
    import torch

    from calibration.trajectories import _tensor_digest  # the trajectory cache's hash of a condition

    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    return {"shape": list(t.shape), "sha256": _tensor_digest(t.reshape(-1))}  # reshape: 0-d tensors too


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
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_content).encode()).hexdigest()


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
            except (json.JSONDecodeError, TypeError):
                self.records = {}  # an unreadable ledger only costs a rebuild

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
        self.records[name] = rec
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: {**asdict(v), "reused": False} for k, v in self.records.items()}, indent=2))
        os.replace(tmp, self.path)
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
