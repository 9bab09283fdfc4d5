"""The limit: the worker's own runtime on the same model file, in this process, no queue."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class LimitResult:
    rows_per_s: float
    best_batch: int
    by_batch: dict[int, float]
    rows: int
    seconds: float
    artifact: str


def measure_limit(repo: Path, ref: str, threads: int, batches: tuple[int, ...],
                  base: np.ndarray, rows_per_batch_size: int) -> LimitResult:
    """Best rows/s over ``batches``, through ``workers.runtimes.load_runtime`` (for text
    models that is ``TextRuntime``: tokenizing and per-batch padding included)."""
    from shared.repository import ModelRepository
    from workers.runtimes import load_runtime

    version = ModelRepository(repo).resolve(ref)
    runtime = load_runtime(version, threads=threads)
    runtime.warm_up(max(batches))
    name = version.manifest.inputs[0].name
    by_batch: dict[int, float] = {}
    total_rows, total_s = 0, 0.0
    for size in batches:
        blocks = -(-rows_per_batch_size // size)
        data = np.concatenate([base] * (-(-blocks * size // len(base))))[:blocks * size]
        feeds = [{name: data[i:i + size]} for i in range(0, len(data), size)]
        runtime.run(feeds[0])  # this shape once untimed
        started = time.perf_counter()
        for feed in feeds:
            runtime.run(feed)
        seconds = time.perf_counter() - started
        by_batch[size] = len(data) / seconds
        total_rows += len(data)
        total_s += seconds
    best = max(by_batch, key=lambda b: by_batch[b])
    del runtime
    gc.collect()
    return LimitResult(by_batch[best], best, by_batch, total_rows, total_s,
                       str(version.artifact))
