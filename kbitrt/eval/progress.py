"""Rich progress bars on stderr (quiet when not a terminal or disabled): one bar factory, used for
evaluations (items), conversions (bytes) and sweeps (cells)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)

_console = Console(stderr=True)


def new_bar(*counts: ProgressColumn, transient: bool = True, console: Console | None = None,
            ) -> Progress:
    """description | bar | `counts` | time left | the task's `what` field (dim); on stderr, or on
    `console` (print through it while the bar runs)."""
    return Progress(TextColumn("{task.description}", style="cyan"), BarColumn(), *counts,
                    TimeRemainingColumn(), TextColumn("{task.fields[what]}", style="dim"),
                    console=console or _console, transient=transient)


@contextlib.contextmanager
def progress_bar(desc: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(n); a bar counting items on stderr while it runs."""
    if not enabled:
        yield lambda n: None
        return
    with new_bar(MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(desc, total=total, what="")
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def byte_progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    """Yields the (what, bytes done, bytes total) callback the converter takes (None: no bar)."""
    if not enabled:
        yield None
        return
    bar = new_bar(DownloadColumn())
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        phase = "outlier statistics" if what == "outlier statistics" else \
            "GPTQ" if what.startswith("GPTQ") else "converting"
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, what="")
        bar.update(tasks[phase], completed=done, total=total, what=what[-48:])

    with bar:
        yield update
