"""engines.heap.release_heap: collects cycles and trims the C heap where glibc has malloc_trim."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pytest

from engines import heap


def _has_malloc_trim() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim")
    except OSError:
        return False


def test_release_heap_collects_and_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: (lambda pad: calls.append(pad) or 1))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc") or 0)
    assert heap.release_heap() is True
    assert calls == ["gc", 0]  # collected first, then trimmed with no padding kept


def test_release_heap_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_heap() is False


@pytest.mark.skipif(not _has_malloc_trim(), reason="the C library has no malloc_trim (not glibc)")
def test_finds_glibc_malloc_trim():
    trim = heap._malloc_trim()
    assert trim is not None and trim(0) in (0, 1)
    heap.release_heap()  # the real call runs
