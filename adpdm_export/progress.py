"""Progress reporting for long work, on stderr so stdout stays machine-readable."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@contextlib.contextmanager
def step_progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields an `on_step(done, total)` callback that drives one progress bar."""
    if not enabled:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)

        def on_step(done: int, total_: int) -> None:
            progress.update(task, completed=done, total=total_)

        yield on_step
