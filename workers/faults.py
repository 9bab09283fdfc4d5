"""Fault injection for tests and chaos runs only (``INFERQ_FAULT_INJECTION``).

A comma list of ``key=value``: ``delay_ms=20`` sleeps in every model call (so a test can
kill a worker mid-job); ``raise_on=-7`` makes the model raise on any row whose first
value is -7 (a poison row); ``exit_on=-9`` kills the process on such a row. Empty in
production: the wrapper is then not installed at all.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from workers.batcher import Inputs, Outputs, RunFn

logger = logging.getLogger(__name__)


def parse(spec: str) -> dict[str, float]:
    faults: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("delay_ms", "raise_on", "exit_on"):
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


def wrap(run: RunFn, spec: str) -> RunFn:
    faults = parse(spec)
    if not faults:
        return run
    logger.warning("fault injection is ON: %s", faults)

    def faulty(inputs: Inputs) -> Outputs:
        if "delay_ms" in faults:
            time.sleep(faults["delay_ms"] / 1000.0)
        firsts = _first_values(inputs)
        if "exit_on" in faults and (firsts == faults["exit_on"]).any():
            os._exit(17)
        if "raise_on" in faults and (firsts == faults["raise_on"]).any():
            raise ValueError(f"injected fault: a row starts with {faults['raise_on']}")
        return run(inputs)

    return faulty
