"""The one progress callback shape of the toolchain: `progress(stage, done, total, loss)`.

Every long step (trajectory sampling, statistics, weight clipping, SRM, the group search,
export) reports through it; `loss` is the current loss where the stage optimises something,
else None. The CLI draws one bar per stage (adpdm_export.progress.stage_progress).
"""

from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[str, int, int, Optional[float]], None]


def no_progress(stage: str, done: int, total: int, loss: Optional[float] = None) -> None:
    """The callback used when the caller passes none."""


def stage_steps(progress: Optional[Progress], stage: str) -> Optional[Callable[[int, int], None]]:
    """`progress` as the `(done, total)` step callback of one stage (None stays None)."""
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total, None)
