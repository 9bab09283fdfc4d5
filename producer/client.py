"""The Python SDK: submit jobs, read them back from any process, score many rows."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import Celery

from producer.bulk.batch import BatchHandle
from producer.bulk.chunks import check_fits
from producer.coalesce import Coalescer
from producer.inflight import LOST_AFTER_S, MAX_RESENDS, InFlight, Sent
from producer.publish import (
    PUBLISH_RETRY,
    Sender,
    coerce_inputs,
    deadline_after,
    not_sent,
    wire_inputs,
)
from shared import keys, tracing
from shared.queues import check_priority
from shared.repository import ModelRef
from shared.results import is_final, to_result
from shared.schemas import JobResult, JobStatus
from shared.settings import Settings

logger = logging.getLogger(__name__)


class Client(Sender):
    """One per process; thread-safe for submit/get.

    ``Client()`` reads ``INFERQ_*`` settings; with no broker configured it talks to the
    embedded in-memory broker, which needs a worker in the same process
    (see ``workers.main.embedded_worker``).
    """

    def __init__(self, settings: Settings | None = None, app: Celery | None = None):
        super().__init__(settings, app)
        # With a Redis result store, workers also publish this process's results on its
        # own channel: a waiting job needs no subscription of its own (producer/waiter.py).
        self.reply_channel = (keys.new_reply_channel()
                              if self.store.claims.supported else None)
        self.coalescer = Coalescer(self, PUBLISH_RETRY, reply_to=self.reply_channel)
        self.inflight = InFlight()  # single jobs not waited for yet (producer/inflight.py)
        self._replies_ready = False

    def submit(self, model: str, row: Any, *, job_id: str | None = None,
               priority: str = "normal", expires_in: float | None = None) -> Job:
        """Enqueue one row (or a few, as a 2-D array); validated here, before sending.

        ``priority``: "high" jobs are taken before the model's "normal" backlog.
        ``expires_in``: seconds; a job no worker has started by then is not run and ends
        ``expired``.
        """
        check_priority(priority)
        deadline = deadline_after(expires_in)
        version, ref = self.model(model)
        inputs = wire_inputs(coerce_inputs(version.manifest, row))
        check_fits(self.settings, inputs)
        job_id = job_id or uuid.uuid4().hex
        with tracing.submitting(ref.name, job_id):
            carrier = tracing.outgoing()
            replying = self._send(ref, job_id, inputs, priority, deadline)
        self.inflight.add(job_id, ref, inputs, priority, deadline, replying, carrier)
        return Job(self, job_id, ref.name)

    def _send(self, ref: ModelRef, job_id: str, inputs: dict[str, Any], priority: str,
              deadline: float | None) -> bool:
        """Record the job as queued and put it on the broker; -> whether its result comes
        back on this process's reply channel."""
        if self.settings.coalesce:  # concurrent submits share a message
            self._listen_for_replies()
            self.coalescer.publish(ref, job_id, inputs, priority, deadline)
            return self.coalescer.reply_to is not None
        try:
            self.store.mark_queued(job_id, {"model": ref.name, "submitted_at": time.time()})
            self.publish(ref, job_id, inputs, priority=priority, deadline=deadline)
        except Exception as exc:
            error = not_sent(f"job {job_id} (model {ref.name})", self, exc)
            if error is exc:
                raise
            raise error from exc
        return False

    def submit_many(self, model: str, rows: Any, *, chunk_rows: int | None = None,
                    batch_id: str | None = None, priority: str = "normal",
                    expires_in: float | None = None) -> BatchHandle:
        """Enqueue many rows as binary chunks; results come back in input order.

        ``priority`` and ``expires_in`` as for :meth:`submit`, for every chunk.
        """
        return BatchHandle.start(self, model, np.asarray(rows),
                             chunk_rows or self.settings.chunk_rows, batch_id,
                             priority=check_priority(priority),
                             deadline=deadline_after(expires_in))

    # -- reading -------------------------------------------------------------------------
    def get(self, job_id: str) -> JobResult:
        """The job's status and, when done, its outputs; works from any process."""
        return to_result(job_id, self.store.fetch(job_id))

    def wait(self, job_id: str, timeout: float | None = 30.0) -> JobResult:
        """Block until the job ends (or ``timeout`` s pass: TimeoutError). A job this
        client sent that looks lost meanwhile is sent again (``producer/inflight.py``)."""
        sent = self.inflight.pop(job_id)
        if sent is None:
            return to_result(job_id, self.store.wait(job_id, timeout))
        end = None if timeout is None else time.monotonic() + timeout
        replying, resends = sent.replying, 0
        while True:
            piece = LOST_AFTER_S * 2 ** resends
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                span = piece if left is None else min(piece, left)
                meta = (self.store.wait_reply(job_id, span) if replying
                        else self.store.wait(job_id, span))
                self.inflight.finished(sent)
                return to_result(job_id, meta)
            except TimeoutError:
                if left is not None and left <= piece:
                    raise TimeoutError(f"job {job_id} not finished after {timeout} s (status "
                                       f"{self.get(job_id).status.value})") from None
            if resends < MAX_RESENDS and self._passed_by(sent):
                logger.warning("job %s unfinished after %.0f s while a job sent after it "
                               "finished: sending it again", job_id, piece)
                self.publish(sent.ref, job_id, sent.inputs, priority=sent.priority,
                             deadline=sent.deadline, trace=sent.trace or {})
                self.inflight.resent += 1
                replying, resends = False, resends + 1  # its result comes on its key

    def _passed_by(self, sent: Sent) -> bool:
        """Has a job of its priority sent after ``sent`` finished? (Then ``sent`` was not
        just queued behind others.)"""
        if self.inflight.passed(sent):
            return True
        return any(is_final(m) for m in self.store.fetch_many(self.inflight.later(sent)))

    def _listen_for_replies(self) -> None:
        """Before the first job goes out with the reply channel, be subscribed to it."""
        if self._replies_ready or self.reply_channel is None:
            return
        waiter = self.store.waiter()
        if waiter is None or not waiter.ready(self.reply_channel.encode()):
            self.coalescer.reply_to = None  # no listener: results are read from the store
        self._replies_ready = True

    def cancel(self, job_id: str) -> bool:
        """Cancel a job no worker has started; False when it already ran (or is running)."""
        self.store.fetch(job_id)  # raises JobNotFound for an unknown id
        return self.store.cancel([job_id])[0]


@dataclass
class Job:
    client: Client
    id: str
    model: str

    def status(self) -> JobStatus:
        return self.client.get(self.id).status

    def result(self, timeout: float | None = 30.0) -> dict[str, np.ndarray]:
        """The outputs; raises JobFailed if the job or its row failed (JobCancelled, a
        JobFailed, if it was cancelled)."""
        return self.client.wait(self.id, timeout).checked_outputs()
