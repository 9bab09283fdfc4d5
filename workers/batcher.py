"""The dynamic batcher: one thread owns the model and merges rows from many tasks.

Task threads hand rows to :meth:`Batcher.submit` and wait on a Future. The batcher
thread takes the waiting rows, up to ``max_batch_rows``; it waits for more only while
some task has announced rows that are not yet submitted, and never past
``max_delay_ms`` after the first waiting row, so a lone job on an idle worker runs at
once: on the task's own thread (no hand-off to the batcher thread and back), still one
model call at a time. A model call that raises is bisected until the failing rows are
found; only those rows get an error, every other row gets its output.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from shared import backoff, tracing
from shared.errors import BatchContractError
from workers.device_errors import EXIT_DEVICE_LOST, is_transient

logger = logging.getLogger(__name__)

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
RunFn = Callable[[Inputs], Outputs]


@dataclass
class Outcome:
    """What one submitted job gets back: outputs for every row (zeros where it failed)."""

    outputs: Outputs | None
    errors: dict[int, str]  # row within the job -> message
    batch_rows: list[int]  # the size of each model call the job's rows ran in


@dataclass
class _Ticket:
    used: bool = False


@dataclass
class _Job:
    rows: int
    future: Future[Outcome]
    parts_left: int
    # offset -> (outputs, errors, rows of the model call, rows of the part)
    parts: dict[int, tuple[Outputs | None, dict[int, str], int, int]] = field(
        default_factory=dict)


@dataclass
class _Part:
    job: _Job
    offset: int  # first row of this part within its job
    inputs: Inputs
    rows: int
    arrived: float
    # A suspect row (submit_alone): run in a model call of its own, inside ``guard()``;
    # with ``refused``, not run at all: the row fails with that message.
    alone: bool = False
    guard: Callable[[], AbstractContextManager[object]] | None = None
    refused: str | None = None
    links: tuple[object, ...] = ()  # span contexts of the traced jobs it holds rows of


def _rows_of(inputs: Inputs) -> int:
    counts = {name: len(value) for name, value in inputs.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"inputs disagree on the number of rows: {counts}")
    return next(iter(counts.values()))


class Batcher:
    def __init__(self, run: RunFn, *, name: str, max_batch_rows: int, max_delay_ms: float,
                 on_batch: Callable[[int, float], None] | None = None,
                 transient_retries: int = 3,
                 device_lost: Callable[[BaseException], bool] = lambda exc: False):
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self._run = run
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.max_delay = max_delay_ms / 1000.0
        self._on_batch = on_batch
        self.transient_retries = transient_retries
        self.device_lost = device_lost  # an error after which the process must exit
        self._queue: deque[_Part] = deque()
        self._queued_rows = 0
        self._announced = 0
        self._cond = threading.Condition()
        self._running = False
        self._busy = False  # a model call runs (the batcher thread's or a task's own)
        self._thread: threading.Thread | None = None

    # -- the task side -------------------------------------------------------------------
    @contextmanager
    def announced(self) -> Iterator[_Ticket]:
        """Tell the batcher rows are coming (decode, validate), so it waits for them.

        Pass the ticket to :meth:`submit`; leaving without submitting withdraws it.
        """
        ticket = _Ticket()
        with self._cond:
            self._announced += 1
        try:
            yield ticket
        finally:
            with self._cond:
                if not ticket.used:
                    self._announced -= 1
                    self._cond.notify()

    def submit(self, inputs: Inputs, ticket: _Ticket | None = None,
               links: tuple[tuple[int, object], ...] = (), *, here: bool = False
               ) -> Future[Outcome]:
        """``links``: (first row, span context) of each traced job these rows belong to,
        in row order (``shared.tracing.links``); each model call's span links the jobs
        whose rows it runs. ``here``: when nothing runs, waits or is announced, run the
        call on this thread before returning (the caller waits for the result anyway)."""
        rows = _rows_of(inputs)
        future: Future[Outcome] = Future()
        if rows == 0:
            future.set_result(Outcome(outputs=None, errors={}, batch_rows=[]))
            return future
        size = self.max_batch_rows
        offsets = range(0, rows, size)
        job = _Job(rows=rows, future=future, parts_left=len(offsets))
        now = time.monotonic()
        with self._cond:
            if not self._running:
                raise RuntimeError(f"batcher for {self.name} is not running")
            if ticket is not None and not ticket.used:
                ticket.used = True
                self._announced -= 1
            # Nothing runs, waits or is about to arrive: run here (docs/design.md)
            alone = here and not (self._busy or self._queue or self._announced) \
                and rows <= size
            self._busy = self._busy or alone
            for off in offsets:
                part = {k: v[off:off + size] for k, v in inputs.items()}
                n = min(size, rows - off)
                made = _Part(job, off, part, n, now, links=_overlapping(links, off, off + n, rows))
                if not alone:
                    self._queue.append(made)
                    self._queued_rows += n
            self._cond.notify()
        if alone:
            self._run_batch([made])
        return future

    def submit_alone(self, inputs: Inputs, skip: dict[int, str],
                     guard: Callable[[int], AbstractContextManager[object]],
                     first: Sequence[int] = ()) -> Future[Outcome]:
        """Each row in a model call of its own, sharing none with other rows, and never
        while another call of this batcher runs (a suspect message: workers/deliveries.py).
        Row i's call runs on the batcher thread inside ``guard(i)``; a row in ``skip`` is
        not run and fails with its message. Rows in ``first`` run before the others."""
        rows = _rows_of(inputs)
        future: Future[Outcome] = Future()
        if rows == 0:
            future.set_result(Outcome(outputs=None, errors={}, batch_rows=[]))
            return future
        job = _Job(rows=rows, future=future, parts_left=rows)
        now = time.monotonic()
        with self._cond:
            if not self._running:
                raise RuntimeError(f"batcher for {self.name} is not running")
            ahead = [i for i in dict.fromkeys(first) if 0 <= i < rows]
            for i in ahead + sorted(set(range(rows)).difference(ahead)):
                part = {k: v[i:i + 1] for k, v in inputs.items()}
                self._queue.append(_Part(job, i, part, 1, now, alone=True,
                                         guard=partial(guard, i), refused=skip.get(i)))
                self._queued_rows += 1
            self._cond.notify()
        return future

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the batcher thread --------------------------------------------------------------
    def _take(self) -> list[_Part] | None:
        with self._cond:
            while not self._queue or self._busy:  # a task's own call runs: wait for it
                if not self._queue and not self._running:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_delay
            while self._queued_rows < self.max_batch_rows and self._announced > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Part] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_rows):
                if batch and (batch[0].alone or self._queue[0].alone):
                    break  # a suspect row goes alone
                part = self._queue.popleft()
                batch.append(part)
                rows += part.rows
            self._queued_rows -= rows
            self._busy = True
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Part]) -> None:
        """One model call (``_busy`` is set), on whichever thread took the batch."""
        try:
            self._execute(batch)
        except BaseException as exc:  # never leave a waiting task hanging
            logger.exception("batcher %s: batch of %d parts failed", self.name, len(batch))
            for part in batch:
                if not part.job.future.done():
                    part.job.future.set_exception(exc)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()  # the batcher thread may wait for this call

    def _execute(self, batch: list[_Part]) -> None:
        if batch[0].alone:
            self._execute_alone(batch[0])
            return
        names = batch[0].inputs.keys()
        merged = {k: np.concatenate([p.inputs[k] for p in batch]) if len(batch) > 1
                  else batch[0].inputs[k] for k in names}
        total = sum(p.rows for p in batch)
        started = time.perf_counter()
        with tracing.model_call(self.name, total, [c for p in batch for c in p.links]):
            outputs, errors = self._run_bisect(merged, total)
        if self._on_batch is not None:
            self._on_batch(total, time.perf_counter() - started)
        offset = 0
        for part in batch:
            sl = slice(offset, offset + part.rows)
            part_out = None if outputs is None else {k: v[sl] for k, v in outputs.items()}
            part_err = {i - offset: m for i, m in errors.items() if offset <= i < sl.stop}
            self._finish_part(part, part_out, part_err, total)
            offset += part.rows

    def _execute_alone(self, part: _Part) -> None:
        if part.refused is not None:
            self._finish_part(part, None, {0: part.refused}, 0)
            return
        assert part.guard is not None
        started = time.perf_counter()
        with part.guard():
            outputs, errors = self._run_bisect(part.inputs, 1)
        if self._on_batch is not None:
            self._on_batch(1, time.perf_counter() - started)
        self._finish_part(part, outputs, errors, 1)

    def _run_checked(self, inputs: Inputs, rows: int) -> Outputs:
        outputs = self._run(inputs)
        for name, value in outputs.items():
            if len(value) != rows:
                raise BatchContractError(
                    f"model {self.name} returned {len(value)} rows of {name!r} for {rows} inputs")
        return outputs

    def _run_bisect(self, inputs: Inputs, rows: int) -> tuple[Outputs | None, dict[int, str]]:
        """Run the rows; if the call raises, split until the failing rows are isolated.

        Splitting is also the answer to a batch too big for the device (out of memory);
        a single row that fails with a transient error is retried after a backoff."""
        try:
            return self._run_checked(inputs, rows), {}
        except BatchContractError as exc:  # a model bug: splitting will not help
            logger.error("%s", exc)
            return None, {i: f"{type(exc).__name__}: {exc}" for i in range(rows)}
        except Exception as exc:
            if self.device_lost(exc):
                self._exit_for_device(exc)
            if rows == 1:
                return self._run_one_retrying(inputs, exc)
        mid = rows // 2
        left, left_err = self._run_bisect({k: v[:mid] for k, v in inputs.items()}, mid)
        right, right_err = self._run_bisect({k: v[mid:] for k, v in inputs.items()}, rows - mid)
        errors = {**left_err, **{i + mid: m for i, m in right_err.items()}}
        return _concat([(left, mid), (right, rows - mid)]), errors

    def _exit_for_device(self, exc: Exception) -> None:
        """The device is gone or broken: every later call would fail too. Exit non-zero
        without acking, so the broker hands this worker's messages to others (and the
        launcher, compose or Kubernetes restarts it)."""
        logger.critical("model %s: the device failed (%s: %s); exiting so its messages "
                        "are redelivered elsewhere", self.name, type(exc).__name__, exc)
        logging.shutdown()
        os._exit(EXIT_DEVICE_LOST)

    def _run_one_retrying(self, inputs: Inputs, exc: Exception
                          ) -> tuple[Outputs | None, dict[int, str]]:
        """A row whose call raised ``exc``: retried while the error is transient (out of
        memory, a device error), ``transient_retries`` times with backoff and jitter."""
        for attempt in range(self.transient_retries):
            if not is_transient(exc):
                break
            pause = backoff.exponential(attempt, 0.05, 2.0, backoff.SPREAD)
            logger.warning("model %s: transient error on a row (%s); retry %d of %d in "
                           "%.2f s", self.name, exc, attempt + 1, self.transient_retries,
                           pause)
            time.sleep(pause)
            try:
                return self._run_checked(inputs, 1), {}
            except Exception as again:  # noqa: BLE001 - judged by is_transient above
                exc = again
        logger.warning("model %s failed on a row: %s", self.name, exc)
        return None, {0: f"model {self.name} failed on this row: {type(exc).__name__}: {exc}"}

    def _finish_part(self, part: _Part, outputs: Outputs | None, errors: dict[int, str],
                     batch_rows: int) -> None:
        job = part.job
        job.parts[part.offset] = (outputs, errors, batch_rows, part.rows)
        job.parts_left -= 1
        if job.parts_left:
            return
        ordered = [job.parts[off] for off in sorted(job.parts)]
        if len(ordered) > 1 and all(p[3] == 1 for p in ordered):
            job.future.set_result(_stack_rows(ordered))
            return
        all_errors: dict[int, str] = {}
        done = 0
        for _, err, _, n in ordered:
            all_errors.update({done + i: m for i, m in err.items()})
            done += n
        merged = _concat([(out, n) for out, _, _, n in ordered])
        job.future.set_result(Outcome(merged, all_errors,
                                      [b for _, _, b, _ in ordered if b]))


def _overlapping(links: tuple[tuple[int, object], ...], start: int, stop: int, rows: int
                 ) -> tuple[object, ...]:
    """The contexts in ``links`` ((first row, context), in row order, ``rows`` in all)
    of the jobs with a row in [start, stop)."""
    if not links:
        return ()
    ends = [first for first, _ in links[1:]] + [rows]
    return tuple(c for (first, c), end in zip(links, ends, strict=True)
                 if first < stop and end > start)


def _stack_rows(parts: list[tuple[Outputs | None, dict[int, str], int, int]]) -> Outcome:
    """One-row parts (a suspect job) -> one outcome, zeros where a row failed."""
    first = next((out for out, _, _, _ in parts if out is not None), None)
    errors = {i: err[0] for i, (_, err, _, _) in enumerate(parts) if err}
    calls = [b for _, _, b, _ in parts if b]
    if first is None:
        return Outcome(None, errors, calls)
    outputs = {k: np.zeros((len(parts), *v.shape[1:]), v.dtype) for k, v in first.items()}
    for i, (out, _, _, _) in enumerate(parts):
        if out is not None:
            for k, v in out.items():
                outputs[k][i] = v[0]
    return Outcome(outputs, errors, calls)


def _concat(blocks: list[tuple[Outputs | None, int]]) -> Outputs | None:
    """Row blocks in order, in one copy; a failed block (None) becomes zeros shaped like
    the others (None when every block failed)."""
    like = next((out for out, _ in blocks if out is not None), None)
    if like is None:
        return None
    if len(blocks) == 1:
        return dict(like)
    return {k: np.concatenate([
        out[k] if out is not None else np.zeros((n, *v.shape[1:]), v.dtype)
        for out, n in blocks]) for k, v in like.items()}
