"""Where the CPU went during a mode: cores used by the bench process (the producer), the
worker, Redis, and everything else on the machine."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine was busy (first line of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def redis_cpu_seconds(client: Any) -> float:
    """All of Redis (other databases' clients included: it is shared)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def cpu_cores(sources: dict[str, Callable[[], float]], redis_client: Any
              ) -> Iterator[dict[str, float]]:
    """Fill the yielded dict with cores used per source over the block, plus ``redis``,
    ``other`` (the rest of the machine) and ``machine`` (every core)."""
    every = {**sources, "redis": lambda: redis_cpu_seconds(redis_client),
             "machine": machine_busy_seconds}
    before = {name: fn() for name, fn in every.items()}
    started = time.perf_counter()
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        wall = max(time.perf_counter() - started, 1e-9)
        after = {name: fn() for name, fn in every.items()}
        cores = {name: max(0.0, (after[name] - before[name]) / wall) for name in every}
        ours = sum(v for k, v in cores.items() if k != "machine")
        cores["other"] = max(0.0, cores["machine"] - ours)
        result.update({k: round(v, 2) for k, v in cores.items()})


def describe(cores: dict[str, float]) -> str:
    """``prod 0.95 wrk 0.80 redis 0.20 other 0.05`` for the table."""
    short = {"producer": "prod", "api": "api", "worker": "wrk", "redis": "redis",
             "other": "other"}
    return " ".join(f"{label} {cores[name]:.2f}" for name, label in short.items()
                    if name in cores)
