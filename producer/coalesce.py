"""Group commit for single-job submits: concurrent ``submit`` calls to the same model
share one broker message.

A worker pays ~1 ms of Celery and transport work per message whatever it carries, so
with one message per job, many small concurrent jobs are bound by messages, not by the
model. Here the first submitter of a model becomes the *leader* and publishes what is
pending, its own job included, at once: a lone request waits for nobody. Submitters that
arrive while a leader is publishing queue up; the leader's next message carries them all,
and the leader then hands the role to one of the waiting submitters (it does not serve
others forever). Each job keeps its own id and result; only the message is shared.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from producer.bulk.chunks import SQS_CHUNK_BYTES, payload_bytes
from producer.publish import Sender, not_sent, summary
from shared import tracing
from shared.celery_app import INFER_MANY_TASK
from shared.claims import redis_of
from shared.queues import model_queue
from shared.repository import ModelRef
from shared.results import JobRecord

MAX_JOBS = 256  # jobs per message at most


@dataclass
class Item:
    job_id: str
    inputs: dict[str, Any]
    submitted_at: float
    deadline: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    lead: bool = False  # woken to lead, not because its job was sent
    trace: dict[str, str] | None = None  # its submit span's context (shared/tracing.py)


@dataclass
class _Group:
    pending: list[Item] = field(default_factory=list)
    leading: bool = False


JOB_BYTES = 256  # what a job adds to a message besides its inputs (id, fields, trace)


def _nbytes(inputs: dict[str, Any]) -> int:
    """A job's size in a message: its inputs' bytes (text as UTF-8) and JOB_BYTES."""
    return payload_bytes(inputs) + JOB_BYTES


class Job(Protocol):
    """What a message of several jobs needs of each (``Item``, the API's ``Pending``)."""

    job_id: str
    inputs: dict[str, Any]
    submitted_at: float
    deadline: float | None
    trace: dict[str, str] | None


J = TypeVar("J", bound=Job)


def take(pending: list[J], max_bytes: int) -> list[J]:
    """The next message's jobs: at least one, then while under MAX_JOBS and ``max_bytes``."""
    size = _nbytes(pending[0].inputs) if pending else 0
    n = 1
    while n < min(len(pending), MAX_JOBS):
        size += _nbytes(pending[n].inputs)
        if size > max_bytes:
            break
        n += 1
    batch = pending[:n]
    del pending[:n]
    return batch


class Coalescer:
    def __init__(self, client: Sender, retry_policy: dict[str, Any], *, mark: bool = True,
                 reply_to: str | None = None):
        self.client = client
        self.retry_policy = retry_policy
        self.mark = mark  # record each job as queued before sending (the SDK does)
        # Where the worker also publishes each message's results (producer/waiter.py);
        # with one, every job goes as inferq.infer_many, even alone.
        self.reply_to = reply_to
        # Half the workers' payload cap: a shared message must never be one they refuse;
        # on SQS, what fits its message limit (producer/bulk/chunks.py).
        self.max_bytes = 2**31 if client is None else (
            SQS_CHUNK_BYTES if client.settings.broker_is_sqs
            else client.settings.max_message_bytes // 2)
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, str | None, int | None, str], _Group] = {}
        self.messages = 0
        self.jobs = 0

    def publish(self, ref: ModelRef, job_id: str, inputs: dict[str, Any],
                priority: str = "normal", deadline: float | None = None) -> None:
        """Return once the job is on the broker (or raise why it could not be sent)."""
        item = Item(job_id, inputs, time.time(), deadline, trace=tracing.outgoing())
        key = (ref.name, ref.variant, ref.version, priority)
        with self._lock:
            group = self._groups.setdefault(key, _Group())
            group.pending.append(item)
            lead = not group.leading
            group.leading = True
        if not lead:
            item.done.wait()
            if not item.lead:  # sent by a leader
                if item.error is not None:
                    raise item.error
                return
            item.lead = False  # handed the role: its own job is still pending
            item.done.clear()
        self._lead(ref, priority, group, item)
        if item.error is not None:
            raise item.error

    def _lead(self, ref: ModelRef, priority: str, group: _Group, mine: Item) -> None:
        """Send rounds until ``mine`` is sent; then pass the role to a waiting submitter."""
        while not mine.done.is_set():
            with self._lock:
                batch = take(group.pending, self.max_bytes)
            try:
                self.send(ref, priority, batch)
                error = None
            except BaseException as exc:  # every submitter of the batch hears it
                error = exc
            for it in batch:
                it.error = None if error is None else \
                    not_sent(f"job {it.job_id} (model {ref.name})", self.client, error)
                it.done.set()
        with self._lock:
            if group.pending:
                heir = group.pending[0]
                heir.lead = True
                heir.done.set()
            else:
                group.leading = False

    def send(self, ref: ModelRef, priority: str, batch: list[Item]) -> None:
        if self.mark:
            self._mark(ref, batch)
        self.messages += 1
        self.jobs += len(batch)
        if len(batch) == 1 and self.reply_to is None:
            it = batch[0]
            self.client.publish(ref, it.job_id, it.inputs, retry_policy=self.retry_policy,
                                priority=priority, deadline=it.deadline,
                                submitted_at=it.submitted_at, trace=it.trace or {})
            return
        task_id, kwargs, headers, options = many_message(ref, batch, self.reply_to)
        self.client.send_message(
            INFER_MANY_TASK, task_id, kwargs,
            model_queue(self.client.settings, ref.name, priority), self.retry_policy,
            headers, **options)

    def _mark(self, ref: ModelRef, batch: list[Item]) -> None:
        """Each job recorded as queued, so a reader tells queued from unknown: one round
        trip for the whole batch on Redis."""
        backend = self.client.app.backend
        redis = redis_of(backend)
        if redis is None:
            for it in batch:
                record = JobRecord.queued(it.job_id, ref.name, it.submitted_at)
                backend.store_result(it.job_id, record.result, record.state)
            return
        pipe = redis.pipeline(transaction=False)
        for it in batch:
            record = JobRecord.queued(it.job_id, ref.name, it.submitted_at)
            pipe.set(backend.get_key_for_task(it.job_id), record.encode(backend),
                     ex=self.client.settings.result_expires)
        pipe.execute()


def many_message(ref: ModelRef, batch: Sequence[Job], reply_to: str | None
                 ) -> tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """An ``inferq.infer_many`` message of ``batch``: (task id, kwargs, headers, the
    summary Flower shows); ``reply_to``: where the worker also publishes the results."""
    jobs = [{"id": it.job_id, "inputs": it.inputs, "submitted_at": it.submitted_at}
            for it in batch]
    for job, it in zip(jobs, batch, strict=True):
        if it.deadline is not None:
            job["deadline"] = it.deadline
    return (f"many-{uuid.uuid4().hex}",
            {"model": ref.name, "variant": ref.variant, "version": ref.version,
             "jobs": jobs, "reply_to": reply_to},
            tracing.many_headers([it.trace for it in batch]),
            summary(ref, [it.job_id for it in batch], jobs=len(jobs)))
