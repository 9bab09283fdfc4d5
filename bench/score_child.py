"""``inferq score`` in a child process that prints its own peak RSS as it exits.

Run as ``python -m bench.score_child score ...``: the same code as the ``inferq`` script.
The child's ``ru_maxrss`` (wait4) cannot be used: exec() carries over the high-water mark
of the forked copy of the parent, so it reports the bench process's size. VmHWM of the
child's own address space is exact.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

MARK = "BENCH_VMHWM_KB="


def _report() -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            sys.stderr.write(f"\n{MARK}{line.split()[1]}\n")
            sys.stderr.flush()


def main() -> None:
    atexit.register(_report)
    from cli.main import main as cli

    sys.argv = ["inferq", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
