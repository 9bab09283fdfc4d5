"""Measuring a built model on this machine: rows/s at a thread count and batch size."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def ort_session(path: Path, threads: int,
                runtime_options: Mapping[str, Any] | None = None) -> Any:
    """A CPU session for ``path`` with a manifest's ``runtime_options`` (workers.runtimes)."""
    import onnxruntime as ort

    from workers.runtimes.onnx import session_options

    options, kwargs = session_options(threads, runtime_options)
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"], **kwargs)


def rows_per_s(call: Callable[[], object], rows_per_call: int, *, min_seconds: float = 1.0,
               warmup: int = 3, repeats: int = 3) -> float:
    """Best of ``repeats`` timed runs of at least ``min_seconds`` each (best: least noise)."""
    for _ in range(warmup):
        call()
    best = 0.0
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < min_seconds / repeats or calls < 3:
            call()
            calls += 1
        best = max(best, calls * rows_per_call / elapsed)
    return best


def onnx_rows_per_s(path: Path, inputs: dict[str, np.ndarray], *, threads: int,
                    min_seconds: float = 1.0) -> float:
    session = ort_session(path, threads)
    rows = len(next(iter(inputs.values())))
    return rows_per_s(lambda: session.run(None, inputs), rows, min_seconds=min_seconds)


def speed_record(rps: float, *, threads: int, batch: int) -> dict[str, float]:
    return {"rows_per_s": round(rps, 1), "threads": float(threads), "batch": float(batch)}


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch uses ``threads`` threads inside (None: unchanged); the old setting is restored."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
