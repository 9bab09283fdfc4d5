"""Bulk jobs: publish chunks with deterministic ids, collect results in input order.

A bulk job is many tasks named ``<batch id>-<chunk number>``. Publishing runs ahead of
collection by at most ``max_in_flight`` chunks, so a producer's memory stays flat on
any input size. Results are read many keys per round trip. Because ids are
deterministic, a rerun with the same batch id finds finished chunks in the result store
and does not send them again (``--resume``).

A result store that cannot be reached while results are collected (a restart, a
failover) is waited for, up to the stall timeout (``STORE_OUTAGE_S`` without one); the
workers keep storing meanwhile. A chunk whose task failed only because its worker could
not reach the result store (``STORE_FAILURES``) is sent again. A chunk that cannot be
published raises an Unavailable naming the chunk and the broker.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import states
from celery.exceptions import BackendStoreError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.bulk.chunks import (
    Chunk,
    ChunkResult,
    array_chunks,
    check_fits,
    chunk_budget,
    chunk_rows_for,
    merge,
)
from producer.publish import Sender, not_sent
from shared import backoff
from shared.errors import JobFailed, Unavailable
from shared.repository import ModelRef
from shared.results import is_final, result_value

logger = logging.getLogger(__name__)

_MGET_MAX = 256  # keys per result-store round trip


def chunk_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:07d}"


# A chunk nobody has claimed this long after it was sent, while chunks sent after it have
# finished, was most likely lost between a worker's BRPOP and its unacked record (kombu's
# Redis transport has that window: a worker SIGKILLed there drops the message). It is
# sent again; should the first copy run after all, the result is the same.
LOST_AFTER_S = 10.0
MAX_RESENDS = 3  # per chunk; the wait after each doubles
CLAIMED_CHECKS = 3  # looks at a claimed, unfinished head chunk before it is sent again

# Longest the result store may stay unreachable while collecting, without a stall timeout.
STORE_OUTAGE_S = 120.0
STORE_DOWN = (RedisConnectionError, RedisTimeoutError)  # BusyLoadingError is one too
# A chunk's task failed with one of these: the worker ran it (or was about to) but could
# not reach the result store; the rows are fine, so the chunk is sent again.
STORE_FAILURES = (BackendStoreError, *STORE_DOWN)


@dataclass
class _Pending:
    chunk: Chunk
    job_id: str
    meta: dict | None = None
    sent_at: float = 0.0
    resends: int = 0
    claimed_seen: int = 0  # checks that found it claimed by a worker, still unfinished
    stale: str | None = None  # date_done of a failure already answered by a resend


def publish_chunk(client: Sender, ref: ModelRef, input_name: str, job_id: str, chunk: Chunk,
                  producer: object, *, keep_data: bool = False, **kwargs: Any) -> None:
    """Send a chunk's valid rows, labelled with their input row numbers; then drop the
    data unless ``keep_data`` (only what merging needs is kept)."""
    # Text rows have no fixed size: a chunk of long ones may not fit an SQS message.
    check_fits(client.settings, {input_name: chunk.data},
               f"chunk of rows {chunk.start}..{chunk.start + chunk.rows - 1}",
               "pass fewer rows per chunk (--chunk-rows, INFERQ_CHUNK_ROWS)")
    extra: dict[str, Any] = {}
    if len(chunk.keep) == chunk.rows:
        extra["first_row"] = chunk.start
    else:
        extra["row_ids"] = chunk.start + chunk.keep.astype(np.int64)
    try:
        client.publish(ref, job_id, {input_name: chunk.data}, producer=producer, **extra,
                       **kwargs)
    except Exception as exc:
        error = not_sent(f"chunk {job_id} (rows {chunk.start}..{chunk.start + chunk.rows - 1})",
                         client, exc, "run the batch again with the same batch id to resume")
        if error is exc:
            raise
        raise error from exc
    if not keep_data:
        chunk.data = chunk.data[:0]


class Pipeline:
    """Publishes chunks and yields their results in input order."""

    def __init__(self, client: Sender, model: str, batch_id: str, *,
                 max_in_flight: int | None = None, stall_timeout: float | None = None,
                 priority: str = "normal", deadline: float | None = None):
        self.client = client
        self.priority = priority
        self.deadline = deadline
        self.version, self.ref = client.model(model)
        self.batch_id = batch_id
        self.max_in_flight = max_in_flight or client.settings.max_in_flight
        self.stall_timeout = stall_timeout
        self.sent = 0
        self.reused = 0
        self.resent = 0
        self.store_outages = 0
        self._store_down: float | None = None  # since when the store has been unreachable

    def _publish(self, chunk: Chunk, producer: object) -> _Pending:
        job_id = chunk_id(self.batch_id, chunk.index)
        if not len(chunk.keep):
            return _Pending(chunk, job_id, meta={"status": "SUCCESS", "result": {}})
        publish_chunk(self.client, self.ref, self.version.manifest.input().name, job_id,
                      chunk, producer, keep_data=True, priority=self.priority,
                      deadline=self.deadline)
        self.sent += 1
        return _Pending(chunk, job_id, sent_at=time.monotonic())

    def run(self, chunks: Iterable[Chunk], done: set[int] | None = None
            ) -> Iterator[ChunkResult]:
        """``done``: chunk numbers already finished in the store; they are not sent."""
        done = done or set()
        specs = self.version.manifest.outputs
        window: deque[_Pending] = deque()
        source = iter(chunks)
        exhausted = False
        last_progress = time.monotonic()
        polls = backoff.pauses(0.0005, 0.05)
        with self.client.app.producer_or_acquire() as producer:
            while True:
                while not exhausted and len(window) < self.max_in_flight:
                    chunk = next(source, None)
                    if chunk is None:
                        exhausted = True
                    elif chunk.index in done:
                        window.append(_Pending(chunk, chunk_id(self.batch_id, chunk.index)))
                        self.reused += 1
                    else:
                        window.append(self._publish(chunk, producer))
                if not window:
                    return
                if self._poll_store(window, producer):
                    last_progress, polls = time.monotonic(), backoff.pauses(0.0005, 0.05)
                while window and window[0].meta is not None:
                    entry = window.popleft()
                    yield merge(entry.chunk, specs, result_value(entry.meta))
                if window and window[0].meta is None:
                    if self._store_down is None:  # else the outage has its own limit
                        self._check_stall(last_progress, window[0])
                    time.sleep(next(polls))

    def _poll_store(self, window: deque[_Pending], producer: object) -> bool:
        """``_poll`` then ``_recover``, riding out a result store outage; True on progress
        (the store coming back counts: the stall clock restarts then)."""
        try:
            progressed = self._poll(window, producer)
            if window and window[0].meta is None:
                self._recover(window, producer)
        except STORE_DOWN as exc:
            self._store_unreachable(exc, window[0])
            return False
        if self._store_down is not None:
            logger.warning("batch %s: the result store is back after %.1f s", self.batch_id,
                           time.monotonic() - self._store_down)
            self._store_down = None
            return True
        return progressed

    def _store_unreachable(self, exc: Exception, head: _Pending) -> None:
        now = time.monotonic()
        if self._store_down is None:
            self._store_down = now
            self.store_outages += 1
            logger.warning("batch %s: the result store cannot be reached (%s); waiting for it",
                           self.batch_id, exc)
        limit = STORE_OUTAGE_S if self.stall_timeout is None else self.stall_timeout
        if now - self._store_down > limit:
            raise Unavailable(
                f"the result store has been unreachable for {limit:.0f} s while collecting "
                f"batch {self.batch_id} (waiting for {head.job_id}, rows {head.chunk.start}.."
                f"{head.chunk.start + head.chunk.rows - 1}): {type(exc).__name__}: {exc}; "
                "results already stored are kept: run it again with the same batch id to "
                "resume") from exc

    def _poll(self, window: deque[_Pending], producer: object) -> bool:
        waiting = [p for p in list(window)[:_MGET_MAX] if p.meta is None]
        metas = self.client.store.fetch_many([p.job_id for p in waiting])
        progressed = False
        for entry, meta in zip(waiting, metas, strict=True):
            if meta is None or not is_final(meta):
                continue
            if entry.stale is not None and meta.get("date_done") == entry.stale:
                continue  # the failure a resend answers; its result replaces this
            if (meta.get("status") == states.FAILURE and entry.resends < MAX_RESENDS
                    and isinstance(result_value(meta), STORE_FAILURES)):
                entry.stale = meta.get("date_done")
                self._resend(entry, producer, "failed only because its worker could not "
                             f"store the result ({result_value(meta)!r})")
                continue
            entry.meta = meta
            entry.chunk.data = entry.chunk.data[:0]  # done: no resend needed
            progressed = True
        return progressed

    def _resend(self, entry: _Pending, producer: object, why: str) -> None:
        logger.warning("chunk %s (rows %d..%d) %s: sending it again", entry.job_id,
                       entry.chunk.start, entry.chunk.start + entry.chunk.rows - 1, why)
        publish_chunk(self.client, self.ref, self.version.manifest.input().name,
                      entry.job_id, entry.chunk, producer, keep_data=True,
                      priority=self.priority, deadline=self.deadline)
        entry.sent_at = time.monotonic()
        entry.resends += 1
        self.resent += 1

    def _recover(self, window: deque[_Pending], producer: object) -> None:
        """Send the head chunk again if it looks lost (see LOST_AFTER_S)."""
        head = window[0]
        now = time.monotonic()
        claims = self.client.store.claims
        if (now - head.sent_at < LOST_AFTER_S * 2 ** head.resends or not claims.supported
                or head.resends >= MAX_RESENDS or not any(p.meta is not None for p in window)):
            return
        head.sent_at = now  # look again no sooner than the (doubled) wait from now
        if claims.states([head.job_id])[0] is None:
            self._resend(head, producer, f"unclaimed {LOST_AFTER_S:.0f} s after it was sent "
                         "while later chunks finished")
            return
        # Claimed: a worker has it, or had it and died, and its redelivered copy was then
        # lost in the same BRPOP window. A chunk still unfinished after CLAIMED_CHECKS
        # looks while later chunks finish is sent again; a rerun is harmless.
        head.claimed_seen += 1
        if head.claimed_seen >= CLAIMED_CHECKS:
            head.claimed_seen = 0
            self._resend(head, producer, f"claimed but unfinished {CLAIMED_CHECKS} checks "
                         f"({CLAIMED_CHECKS * LOST_AFTER_S:.0f} s or more) while later chunks "
                         "finished")

    def _check_stall(self, since: float, head: _Pending) -> None:
        if self.stall_timeout is not None and time.monotonic() - since > self.stall_timeout:
            raise TimeoutError(
                f"no result for {head.job_id} (rows {head.chunk.start}.."
                f"{head.chunk.start + head.chunk.rows - 1}) in {self.stall_timeout} s; "
                "is a worker consuming this model's queue?")


def finished_chunks(client: Sender, batch_id: str, count: int) -> set[int]:
    """Chunk numbers of ``batch_id`` whose results are already in the store."""
    done: set[int] = set()
    for first in range(0, count, _MGET_MAX):
        ids = [chunk_id(batch_id, i) for i in range(first, min(count, first + _MGET_MAX))]
        for i, meta in enumerate(client.store.fetch_many(ids)):
            if meta is not None and meta.get("status") == "SUCCESS":
                done.add(first + i)
    return done


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]
    truncated: list[int]

    def __len__(self) -> int:
        return len(self.ok)


class BatchHandle:
    """``Client.submit_many``: every chunk is published at once; ``results()`` collects."""

    def __init__(self, pipeline: Pipeline, chunks: list[Chunk]):
        self.pipeline = pipeline
        self.chunks = chunks

    @property
    def batch_id(self) -> str:
        return self.pipeline.batch_id

    @classmethod
    def start(cls, client: Sender, model: str, rows: np.ndarray, chunk_rows: int | None,
              batch_id: str | None = None, *, priority: str = "normal",
              deadline: float | None = None) -> BatchHandle:
        """``chunk_rows`` None: sized for the model (``chunk_rows_for``)."""
        pipeline = Pipeline(client, model, batch_id or uuid.uuid4().hex,
                            max_in_flight=10**9, priority=priority, deadline=deadline)
        manifest = pipeline.version.manifest
        size = chunk_rows_for(manifest, chunk_rows, budget=chunk_budget(client.settings))
        chunks = list(array_chunks(manifest.input(), rows, size))
        return cls(pipeline, chunks)

    def iter_results(self, timeout: float | None = None) -> Iterator[ChunkResult]:
        self.pipeline.stall_timeout = timeout
        yield from self.pipeline.run(self.chunks)

    def results(self, timeout: float | None = 60.0,
                on_chunk: Callable[[ChunkResult], None] | None = None) -> BatchResult:
        """All rows in input order; ``timeout`` bounds the wait for any one chunk."""
        parts = []
        for part in self.iter_results(timeout):
            parts.append(part)
            if on_chunk:
                on_chunk(part)
        if not parts:
            raise JobFailed("the batch has no rows")
        outputs = {k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs}
        errors = {row: msg for p in parts for row, msg in p.errors.items()}
        truncated = [row for p in parts for row in p.truncated]
        return BatchResult(outputs, np.concatenate([p.ok for p in parts]), errors, truncated)
