"""What every part of the speed benchmark shares: the repository root, logging, failure reasons and
the interleaved round-robin timing."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[bench_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def interleaved(fns: dict[str, Callable[[int], Any]], rounds: int, iters: int, warmup: int,
                failed: dict[str, str]) -> dict[str, list[float]]:
    """Round-robin timing (ms): every round runs each variant `iters` times, the start rotating per round."""
    live = {}
    for name, fn in fns.items():
        try:
            for i in range(max(warmup, 1)):  # at least one untimed call: first-run allocations are not timed
                fn(i)
            live[name] = fn
        except Exception as e:
            log(traceback.format_exc())
            failed[name] = reason(e)
    names = list(live)
    times: dict[str, list[float]] = {n: [] for n in names}
    perf = time.perf_counter
    for r in range(rounds):
        k = r % max(len(names), 1)
        for name in names[k:] + names[:k]:
            fn = live[name]
            for i in range(iters):
                t0 = perf()
                fn(r * iters + i)
                times[name].append((perf() - t0) * 1e3)
    return times
