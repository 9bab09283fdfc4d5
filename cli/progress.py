"""``inferq score``'s progress: a rich bar in a terminal, a plain line every few seconds
when piped (a log file, CI)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from cli.tables import say


class ScoreProgress:
    """Started once the input and model are known good; advanced per finished chunk."""

    def __init__(self, description: str, console: Console, *, on: bool = True):
        # Never cut the model's name: the bar gives up its width first, down to 10 columns.
        width = max(10, min(40, console.width - len(description) - 60))
        self.bar = Progress(
            TextColumn("[bold]{task.description}",
                       table_column=Column(no_wrap=True, min_width=len(description))),
            BarColumn(bar_width=width), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>9} rows/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=not on or not console.is_terminal,
            transient=False)
        self.task = self.bar.add_task(description, total=None, rate="-")
        piped = on and not console.is_terminal
        self.plain = PlainProgress(description, console=console) if piped else None

    def start(self, total: int | None) -> None:
        self.bar.update(self.task, total=total)
        if self.plain:
            self.plain.total = total
        self.bar.start()

    def advance(self, part: Any) -> None:
        if self.plain:
            self.plain.advance(part.rows)
        self.bar.advance(self.task, part.rows)
        t = self.bar.tasks[self.task]
        self.bar.update(self.task, rate=f"{t.completed / t.elapsed:,.0f}" if t.elapsed else "-")

    def stop(self) -> None:
        self.bar.stop()


class PlainProgress:
    """Piped (a log file, CI): a plain progress line every ``every`` seconds instead of a
    redrawn bar."""

    def __init__(self, description: str, every: float = 5.0, console: Console | None = None):
        self.description, self.every, self.console = description, every, console
        self.total: int | None = None
        self.rows = 0
        self.started = self.said = time.monotonic()

    def advance(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.said < self.every:
            return
        self.said = now
        of = f" / {self.total:,} ({self.rows / self.total:.0%})" if self.total else ""
        say(f"{self.description}: {self.rows:,}{of} rows, "
            f"{self.rows / max(1e-9, now - self.started):,.0f} rows/s", self.console)
