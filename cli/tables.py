"""One table, three renderings: a rich table in a terminal wide enough for it, plain
aligned columns otherwise (a pipe, a file, a narrow terminal: nothing is cut short), and
JSON records for programs (``--json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

GAP = "  "


@dataclass
class Grid:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""
    caption: str = ""

    def add(self, *cells: str) -> None:
        self.rows.append([str(c) for c in cells])

    def width(self) -> int:
        """Columns a rich table of this grid needs: cells, padding and borders."""
        widest = [max([len(c)] + [len(r[i]) for r in self.rows if i < len(r)])
                  for i, c in enumerate(self.columns)]
        return sum(widest) + 3 * len(widest) + 1

    def rich(self) -> Table:
        table = Table(*self.columns, title=self.title or None, title_justify="left",
                      caption=self.caption or None)
        for row in self.rows:
            table.add_row(*row)
        return table

    def plain(self) -> str:
        widest = [max([len(c)] + [len(r[i]) for r in self.rows if i < len(r)])
                  for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        for row in [self.columns, *self.rows]:
            cells = [cell.ljust(w) for cell, w in zip(row, widest, strict=False)]
            lines.append(GAP.join(cells).rstrip())
        if self.caption:
            lines.append(self.caption)
        return "\n".join(lines)


def fits(console: Console, grids: Sequence[Grid]) -> bool:
    return console.is_terminal and all(g.width() <= console.width for g in grids)


def show(console: Console, *grids: Grid) -> None:
    """Rich tables where they fit a terminal, else plain columns; never a cut name."""
    if fits(console, grids):
        for grid in grids:
            console.print(grid.rich())
        return
    for i, grid in enumerate(grids):
        if i:
            print()
        print(grid.plain())


def print_json(records: Any) -> None:
    """For ``--json``: plain ``print`` (no console markup, no wrapping)."""
    print(json.dumps(records, default=str))


def say(message: str, console: Console | None = None) -> None:
    """A plain line on stderr: never wrapped or marked up, so it can be grepped."""
    (console or Console(stderr=True)).print(message, soft_wrap=True, highlight=False,
                                            markup=False)
