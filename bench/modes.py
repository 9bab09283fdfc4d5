"""The measured client loops: bulk (N rows end to end) and online (C threads, one row per
job, each waiting for its result), for inferq and for the naive baseline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Measured:
    rows: int
    seconds: float
    errors: int = 0
    first_error: str | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    stored_p50_ms: float | None = None  # submit -> result stored by the worker (inferq)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def inferq_bulk(client: Any, ref: str, rows: np.ndarray, timeout: float) -> Measured:
    """``submit_many`` + ``results()``: from the first row sent to the last result read."""
    started = time.perf_counter()
    result = client.submit_many(ref, rows).results(timeout=timeout)
    seconds = time.perf_counter() - started
    failed = int((~result.ok).sum())
    first = next(iter(result.errors.values()), None)
    return Measured(len(result), seconds, failed, first)


def naive_bulk(rows: Sequence[Any], timeout: float) -> Measured:
    """One ``delay`` per row, then ``.get()`` each in order, as a user would write it."""
    from bench.naive import infer

    started = time.perf_counter()
    pending = [infer.delay(row) for row in rows]
    outputs = [p.get(timeout=timeout) for p in pending]
    seconds = time.perf_counter() - started
    return Measured(len(outputs), seconds)


def percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    if not latencies:
        return None, None
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


Call = Callable[[Any], "float | None"]


def online(call: Call, rows: Sequence[Any] | np.ndarray, concurrency: int,
           seconds: float) -> Measured:
    """``concurrency`` threads, each calling ``call(row)`` (submit one row and wait for its
    result) back to back until ``seconds`` have passed; every latency is kept. ``call``
    may return the seconds until the worker stored the result (else None)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stored: list[float] = []
    errors: list[str] = []
    go = threading.Event()
    stop_at = [0.0]

    def client(i: int) -> None:
        k = i
        go.wait()
        while time.monotonic() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                until_stored = call(rows[k % len(rows)])
            except Exception as exc:  # counted and reported, the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies[i].append(time.perf_counter() - t0)
            if until_stored is not None:
                stored.append(until_stored)
            k += concurrency

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    stop_at[0] = time.monotonic() + seconds
    go.set()
    for t in threads:
        t.join(seconds + 120)  # a call's own timeout bounds each thread
    elapsed = time.perf_counter() - started
    flat = [x for per in latencies for x in per]
    p50, p99 = percentiles(flat)
    return Measured(len(flat), elapsed, len(errors), errors[0] if errors else None, p50, p99,
                    percentiles(stored)[0])


def online_async(client: Any, ref: str, rows: Sequence[Any] | np.ndarray, concurrency: int,
                 seconds: float, timeout: float) -> Measured:
    """``online`` for ``AsyncClient``: ``concurrency`` coroutines on one event loop, each
    ``await submit`` + ``await wait`` back to back (``client`` is a sync Client to wrap)."""
    from producer.aclient import AsyncClient

    latencies: list[float] = []
    errors: list[str] = []

    async def one(aclient: AsyncClient, i: int, stop_at: float) -> None:
        k = i
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                job = await aclient.submit(ref, rows[k % len(rows)])
                (await aclient.wait(job.id, timeout)).checked_outputs()
            except Exception as exc:  # counted and reported, the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            k += concurrency

    async def main() -> float:
        async with AsyncClient(client=client) as aclient:
            await one(aclient, 0, time.monotonic() + 0.5)  # subscribe, first send
            latencies.clear()
            started = time.perf_counter()
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(one(aclient, i, stop_at) for i in range(concurrency)))
            return time.perf_counter() - started

    elapsed = asyncio.run(main())
    p50, p99 = percentiles(latencies)
    return Measured(len(latencies), elapsed, len(errors), errors[0] if errors else None,
                    p50, p99)


def inferq_call(client: Any, ref: str, timeout: float) -> Call:
    """``submit`` + wait, exactly what ``Job.result()`` does, keeping the record's
    ``finished_at`` to split the latency into the worker's part and the client's wait."""
    from shared.errors import JobFailed
    from shared.schemas import JobStatus

    def call(row: Any) -> float | None:
        sent = time.time()
        job = client.submit(ref, row)
        res = client.wait(job.id, timeout)
        if res.status is not JobStatus.succeeded or res.errors:
            raise JobFailed(res.error or "; ".join(e.message for e in res.errors))
        return None if res.finished_at is None else res.finished_at - sent

    return call


def naive_call(timeout: float) -> Call:
    from bench.naive import infer

    def call(row: Any) -> float | None:
        infer.delay(row).get(timeout=timeout)
        return None

    return call
