"""``python -m tests.chaos``: ``pytest tests/chaos -m chaos``, then the summary table.

``--fast`` leaves out the soaks (``-m "chaos and not slow"``, what CI runs); any other
argument goes to pytest as is (a later ``-m`` replaces the one here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    marks = "chaos"
    if "--fast" in args:
        args.remove("--fast")
        marks = "chaos and not slow"
    return int(pytest.main([str(HERE), "-m", marks, *args]))


if __name__ == "__main__":
    raise SystemExit(main())
