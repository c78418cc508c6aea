"""Rich progress bars on stderr for long evaluations (quiet when not a terminal or disabled)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(desc: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(n); a rich bar on stderr while it runs."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=_console,
                  transient=True) as prog:
        task = prog.add_task(desc, total=total)
        yield lambda n: prog.advance(task, n)
