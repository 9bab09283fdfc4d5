"""Tables: rich where a terminal is wide enough, plain columns otherwise, never cut."""

from __future__ import annotations

import io

from rich.console import Console

from cli.tables import Grid, show


def _grid() -> Grid:
    grid = Grid(["version", "quality"], caption="* = default")
    grid.add("a-very-long-model-name@12*", "heldout_accuracy=0.9944, accuracy_delta=0.0000")
    return grid


def test_a_pipe_gets_plain_columns_with_whole_names(capsys) -> None:
    show(Console(file=io.StringIO(), width=40), _grid())  # not a terminal
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["version", "quality"]
    assert out[1].startswith("a-very-long-model-name@12*  heldout_accuracy=0.9944, accuracy")
    assert out[2] == "* = default"


def test_a_narrow_terminal_gets_plain_columns_a_wide_one_a_table(capsys) -> None:
    narrow = Console(file=io.StringIO(), width=60, force_terminal=True)
    show(narrow, _grid())
    assert "a-very-long-model-name@12*" in capsys.readouterr().out
    wide_file = io.StringIO()
    show(Console(file=wide_file, width=120, force_terminal=True, color_system=None), _grid())
    assert "│ a-very-long-model-name@12* │" in wide_file.getvalue()
