"""Fault injection for tests and chaos runs only (``INFERQ_FAULT_INJECTION``).

A comma list of ``key=value``: ``delay_ms=20`` sleeps in every model call (so a test can
kill a worker mid-job); ``row_delay_ms=0.2`` sleeps that long per row of each call (a
cost that grows with the rows, as inference does, so one-row calls stay cheap);
``raise_on=-7`` makes the model raise on any row whose first value is -7 (a poison row);
``exit_on=-9`` kills the process on such a row. Empty in production: the wrapper is then
not installed at all.

``INFERQ_FAULT_LOG=/path`` (chaos tests) appends one line ``<pid> <rows>`` to that file
after every model call that returned, so a test can count rows run more than once
across workers it killed (their own counters die with them). Each line is one
``O_APPEND`` write, so lines of concurrent processes never interleave.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from workers.batcher import Inputs, Outputs, RunFn

logger = logging.getLogger(__name__)

LOG_ENV = "INFERQ_FAULT_LOG"
KEYS = ("delay_ms", "row_delay_ms", "raise_on", "exit_on")


def parse(spec: str) -> dict[str, float]:
    faults: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"INFERQ_FAULT_INJECTION: cannot read {item!r}")
        try:
            faults[key] = float(value)
        except ValueError:
            raise ValueError(f"INFERQ_FAULT_INJECTION: {key} needs a number, got {value!r}"
                             ) from None
    return faults


def _first_values(inputs: Inputs) -> np.ndarray:
    first = next(iter(inputs.values()))
    return first.reshape(len(first), -1)[:, 0]


def wrap(run: RunFn, spec: str, log_path: str | None = None) -> RunFn:
    """``run`` with the faults of ``spec``; ``log_path`` (default: ``INFERQ_FAULT_LOG``)
    records every call that returned. Neither set: ``run`` itself."""
    faults = parse(spec)
    log_path = os.environ.get(LOG_ENV, "") if log_path is None else log_path
    if not faults and not log_path:
        return run
    logger.warning("fault injection is ON: %s%s", faults,
                   f", model calls logged to {log_path}" if log_path else "")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) \
        if log_path else None

    def faulty(inputs: Inputs) -> Outputs:
        firsts = _first_values(inputs)
        pause = faults.get("delay_ms", 0.0) + faults.get("row_delay_ms", 0.0) * len(firsts)
        if pause > 0:
            time.sleep(pause / 1000.0)
        if "exit_on" in faults and (firsts == faults["exit_on"]).any():
            os._exit(17)
        if "raise_on" in faults and (firsts == faults["raise_on"]).any():
            raise ValueError(f"injected fault: a row starts with {faults['raise_on']}")
        outputs = run(inputs)
        if log_fd is not None:
            os.write(log_fd, f"{os.getpid()} {len(firsts)}\n".encode())
        return outputs

    return faulty
