"""Progress reporting for long work, on stderr so stdout stays machine-readable."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from calibration.progress import Progress as ProgressCallback
from calibration.progress import no_progress

console = Console(stderr=True)


@contextlib.contextmanager
def stage_progress(enabled: bool = True) -> Iterator[ProgressCallback]:
    """A `progress(stage, done, total, loss)` callback (calibration.progress) drawing one rich bar per
    stage (on stderr)."""
    if not enabled:
        yield no_progress
        return
    with Progress(
        TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int, loss: Optional[float] = None) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


def stderr_line(text: str) -> None:
    """A log line on stderr (ADP-DM's losses and summary), outside the progress bars."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)
