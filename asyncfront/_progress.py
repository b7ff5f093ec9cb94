"""Progress for long operations: a rich bar on a terminal, nothing anywhere else.

The demo, ``simulate``, weight loads and paging many blocks report their progress
through :func:`progress`. Output goes to standard error and only when it is a terminal,
so pipes, logs, CI and tests stay quiet. ``ASYNCFRONT_PROGRESS=1`` forces it on (``0``
off) for terminals that rich does not recognise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ("ProgressTask", "progress", "progress_console")


class ProgressTask(Protocol):
    """One operation's progress: call :meth:`advance` as its steps finish."""

    def advance(self, steps: float = 1) -> None:
        """Count ``steps`` more steps done."""
        ...


class _Silent:
    """Progress that shows nothing (not a terminal)."""

    def advance(self, steps: float = 1) -> None:
        pass


class _Shown:
    """Progress drawn by a rich bar."""

    def __init__(self, bar: Progress, task: TaskID) -> None:
        self._bar = bar
        self._task = task

    def advance(self, steps: float = 1) -> None:
        self._bar.advance(self._task, steps)


_SILENT = _Silent()
_active = 0  # nested operations report through the outermost bar only


def progress_console(console: Console | None = None) -> Console | None:
    """The console to draw on, or None when progress should stay quiet."""
    forced = os.environ.get("ASYNCFRONT_PROGRESS")
    if forced == "0":
        return None
    from rich.console import Console

    if console is None:
        console = Console(stderr=True, force_terminal=True if forced == "1" else None)
    return console if console.is_terminal else None


@contextmanager
def progress(
    description: str, total: float | None = None, *, console: Console | None = None
) -> Iterator[ProgressTask]:
    """Show a progress bar for ``description`` while the block runs, if on a terminal.

    ``total`` steps (None: unknown, a spinner). ``console`` defaults to standard
    error; nothing is drawn when it is not a terminal, or inside another progress block.
    """
    global _active
    shown = progress_console(console) if _active == 0 else None
    if shown is None:
        yield _SILENT
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=shown,
        transient=False,
    )
    _active += 1
    try:
        with bar:
            yield _Shown(bar, bar.add_task(description, total=total))
    finally:
        _active -= 1
