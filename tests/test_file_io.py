"""engines.file_io: atomic writes (whole file or none) and the content hashes caches are keyed by."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from engines.file_io import atomic_write, atomic_write_text, sha256_file, sha256_json


def test_atomic_write_with_a_writer_callback(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write(p, lambda tmp: open(tmp, "wb").write(b"new"))
    assert p.read_bytes() == b"new" and oct(p.stat().st_mode & 0o777) == "0o644"

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        atomic_write(p, fail)
    assert p.read_bytes() == b"new" and os.listdir(p.parent) == ["f.bin"]  # old content, no temporary left


def test_hashes_match_the_plain_formulas(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "x" * 3_000_000)
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    key = {"b": [1, 2], "a": {"z": 1, "y": None}, "p": tmp_path}
    assert sha256_json({"b": 1, "a": 2}) == hashlib.sha256(json.dumps({"a": 2, "b": 1}).encode()).hexdigest()
    assert sha256_json(key, default=str) == hashlib.sha256(
        json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
