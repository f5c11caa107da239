"""Progress bars that show wherever attnkit runs: a terminal, a Jupyter notebook, a log file.

A terminal gets a rich bar on stderr that disappears when done. A notebook gets one text bar that
updates in place (through IPython's display ids, so it needs no widget library). Anywhere else
(stderr redirected to a file, CI) a plain line is printed every ``every`` items and at the end, so
a log shows how far a long run got and how long it has left. Every form shows an ETA.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LINES = 10
"""Outside a terminal, about this many lines per bar (one every ``ceil(total / LINES)`` items)."""


class Tally:
    """Items done out of ``total`` since ``start``, and the line that says so, with an ETA."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, total, 0
        self.start = time.perf_counter()

    def line(self, width: int = 0) -> str:
        """``needle 3/12 (25%) [####......] 4 s elapsed, ETA 12 s``; the bar only when ``width`` > 0."""
        elapsed = time.perf_counter() - self.start
        share = self.done / self.total if self.total else 1.0
        eta = elapsed / self.done * (self.total - self.done) if self.done else math.nan
        bar = f" [{'#' * round(share * width)}{'.' * (width - round(share * width))}]" if width else ""
        return (
            f"{self.description} {self.done}/{self.total} ({share:.0%}){bar} "
            f"{duration(elapsed)} elapsed, ETA {duration(eta)}"
        )


def duration(seconds: float) -> str:
    """``7 s``, ``3 min 05 s``, ``1 h 02 min``, or ``?`` before the first item finishes."""
    if math.isnan(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where stderr is no terminal but output renders)."""
    return Console().is_jupyter


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Show the progress of ``total`` items where this runs (see the module); yields ``advance(n)``.

    ``enabled=False`` (``--no-progress``) shows nothing.
    """
    if not enabled:
        yield lambda n: None
    elif sys.stderr.isatty():
        with terminal_bar(description, total) as advance:
            yield advance
    elif in_notebook():
        with notebook_bar(description, total) as advance:
            yield advance
    else:
        with log_lines(description, total) as advance:
            yield advance


@contextmanager
def terminal_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich bar on stderr, gone when the block ends so reports print cleanly."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    with bar:
        task_id = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task_id, n)


@contextmanager
def notebook_bar(description: str, total: int, width: int = 30) -> Iterator[Callable[[int], None]]:
    """One text line in the notebook's output, updated in place as items finish."""
    from IPython.display import display

    tally = Tally(description, total)
    handle: Any = display({"text/plain": tally.line(width)}, raw=True, display_id=True)

    def advance(n: int) -> None:
        tally.done += n
        handle.update({"text/plain": tally.line(width)}, raw=True)

    yield advance


@contextmanager
def log_lines(description: str, total: int, every: int | None = None) -> Iterator[Callable[[int], None]]:
    """A line on stderr every ``every`` items (default: about :data:`LINES` per run) and at the end."""
    tally = Tally(description, total)
    every = every or max(1, math.ceil(total / LINES))

    def advance(n: int) -> None:
        before, tally.done = tally.done, tally.done + n
        if tally.done // every > before // every or (tally.done >= total > before):
            print(tally.line(), file=sys.stderr, flush=True)

    yield advance
