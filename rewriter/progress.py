"""Progress reporting: a rich progress bar on a TTY, silence otherwise (and always under --json)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """No-op progress; `RichBar` draws on stderr. Passes and validation only call `task`."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None


class RichBar(Progress):
    def __init__(self) -> None:
        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        with self._bar:
            task_id = self._bar.add_task(description, total=total)
            try:
                yield lambda: self._bar.advance(task_id)
            finally:
                self._bar.remove_task(task_id)


def progress_for(quiet: bool) -> Progress:
    """A bar only when a person is watching: stderr is a TTY and no --json was asked for."""
    return RichBar() if (not quiet and sys.stderr.isatty()) else Progress()
