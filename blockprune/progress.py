"""Progress: rich bars on a terminal, plain lines in a log, and warnings printed through the same console."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_INTERVAL = 30.0  # seconds between two lines of a running bar when output is not a terminal


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


class Bars(Progress):
    """rich's ``Progress``; with ``lines`` (output is not a terminal) each bar also prints a line when it starts,
    every ``interval`` seconds while it runs (count, elapsed, time left) and when it is done."""

    def __init__(self, *columns: Any, lines: bool = False, interval: float = LOG_INTERVAL, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.lines, self.interval = lines, interval
        self._last_line: dict[TaskID, float] = {}

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        """A new bar, below the earlier ones; see ``rich.progress.Progress.add_task``."""
        task_id = super().add_task(description, start=start, total=total, completed=completed, visible=visible, **fields)
        if self.lines:
            self._last_line[task_id] = time.monotonic()
            self.console.print(f"{escape(description)}: started" + (f" (0/{total:g})" if total is not None else ""),
                               highlight=False)
        return task_id

    def update(self, task_id: TaskID, **changes: Any) -> None:
        """See ``rich.progress.Progress.update``."""
        super().update(task_id, **changes)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """See ``rich.progress.Progress.advance``."""
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if not self.lines or task_id not in self._last_line:
            return
        task = next(task for task in self.tasks if task.id == task_id)
        count = f"{task.completed:g}" + (f"/{task.total:g}" if task.total is not None else "")
        if task.finished:
            del self._last_line[task_id]
            self.console.print(f"{escape(task.description)}: done, {count} in {_seconds(task.elapsed)}", highlight=False)
        elif time.monotonic() - self._last_line[task_id] >= self.interval:
            self._last_line[task_id] = time.monotonic()
            left = f", about {_seconds(task.time_remaining)} left" if task.time_remaining is not None else ""
            self.console.print(f"{escape(task.description)}: {count}, {_seconds(task.elapsed)}{left}", highlight=False)


class _ConsoleHandler(logging.Handler):
    """Prints blockprune's log records (warnings and above) through a rich console."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno == logging.WARNING else record.levelname.lower()
        self.console.print(f"[yellow]{level}:[/] {escape(record.getMessage())}", highlight=False)


def _prints_to_the_console(logger: logging.Logger) -> bool:
    """Whether a handler of ``logger`` or its parents already prints to stdout or stderr (``--debug``, say)."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
                return True
        current = current.parent if current.propagate else None
    return False


@contextlib.contextmanager
def console_warnings(console: Console) -> Iterator[None]:
    """While open, blockprune's logged warnings print through ``console`` (unless a handler already prints them),
    and on a terminal Python warnings too, as one line each (``warning: Category: message``) instead of the raw
    ``file:line: Category`` form that would break the live bars."""
    logger = logging.getLogger("blockprune")
    handler = None if _prints_to_the_console(logger) else _ConsoleHandler(console)
    if handler is not None:
        logger.addHandler(handler)
    with warnings.catch_warnings():
        if console.is_terminal:  # elsewhere (logs, pytest's recording) warnings keep their own route

            def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
                console.print(f"[yellow]warning:[/] {category.__name__}: {escape(str(message))}", highlight=False)

            warnings.showwarning = show
        try:
            yield
        finally:
            if handler is not None:
                logger.removeHandler(handler)


@contextlib.contextmanager
def progress_bars(enabled: bool, console: Console | None = None) -> Iterator[Bars]:
    """Progress bars (one per phase, in the order the phases start; ETA where the count is known), silent when
    ``enabled`` is false. On a terminal they are live; otherwise each prints plain lines (:class:`Bars`).
    Warnings print through the same console meanwhile (:func:`console_warnings`)."""
    console = console or Console()
    live = enabled and console.is_terminal
    bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=console, disable=not live, lines=enabled and not live)
    with contextlib.ExitStack() as stack:
        if enabled:
            stack.enter_context(console_warnings(console))
        stack.enter_context(bars)
        yield bars


def mark_cached(bars: Progress, earlier: set[TaskID], cached: list[str], metrics: list[str]) -> None:
    """When every metric's values came from the score cache (``cached`` covers ``metrics``), the bars opened
    since ``earlier`` that were left unfinished say so and are filled, instead of sitting at 0/N."""
    if not metrics or set(metrics) - set(cached):
        return
    for task in bars.tasks:
        if task.id not in earlier and not task.finished:
            bars.update(task.id, description=f"{task.description} (cached)", completed=task.total)


def training_bar(bars: Progress) -> Callable[[str, int, int, float], None]:
    """A listener for :func:`blockprune.sandwich.guard.training_progress` that shows each training (a sandwich
    stage, healing) as a bar of its steps, with the held-out error of its last check."""
    tasks: dict[str, TaskID] = {}

    def listen(name: str, step: int, steps: int, error: float) -> None:
        description = f"{name}: held-out error {error:.4g}"
        if name not in tasks:
            tasks[name] = bars.add_task(description, total=steps)
        bars.update(tasks[name], completed=step, total=steps, description=description)

    return listen
