"""``inferq.infer_many``: several jobs in one message (see ``producer/coalesce.py``).

Each job is claimed, validated and answered on its own, exactly as ``inferq.infer`` would
(a cancelled job is skipped, a bad row fails alone); their valid rows go to the batcher
as one submit, so they share model calls; the results are stored in one round trip.
The message is acked once every job has its result, so a worker dying midway makes the
broker redeliver it and every job runs again (at-least-once, one result per job id).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import Celery, states
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import backoff, tracing
from shared.celery_app import INFER_MANY_TASK
from shared.claims import EXPIRED_STATE, Sent, redis_of
from shared.errors import DeadLettered, InferqError
from shared.results import JobRecord, reply_message
from workers.batcher import Outcome
from workers.deliveries import Delivery
from workers.intake import Intake
from workers.job_rows import finish, validate
from workers.pool import ModelPool, Served

logger = logging.getLogger(__name__)


def _split(outcome: Outcome, sizes: list[int]) -> list[Outcome]:
    """One merged outcome -> one per job (rows ``sizes[i]`` each, in order)."""
    parts, start = [], 0
    for n in sizes:
        outputs = None if outcome.outputs is None else \
            {k: v[start:start + n] for k, v in outcome.outputs.items()}
        errors = {i - start: m for i, m in outcome.errors.items() if start <= i < start + n}
        parts.append(Outcome(outputs, errors, outcome.batch_rows))
        start += n
    return parts


STORE_PATIENCE_S = 60.0  # longest a result store outage is waited out before giving up


def store_many(app: Celery, items: list[tuple[str, str, Any]], reply_to: str | None = None,
               patience_s: float = STORE_PATIENCE_S) -> None:
    """(job id, state, result) each stored and published, one pipeline on Redis; with
    ``reply_to``, also all of them in one message on that channel.

    Retried with backoff and jitter through a store outage of up to ``patience_s``: the
    inference is not redone for it.
    """
    backend = app.backend
    redis = redis_of(backend)
    if redis is None:
        for job_id, state, result in items:
            backend.store_result(job_id, result, state)
        return
    done = app.now().isoformat()
    encoded = []
    for job_id, state, result in items:
        encoded.append((job_id, backend.get_key_for_task(job_id),
                        JobRecord(job_id, state, result, done).encode(backend)))
    give_up = time.monotonic() + patience_s
    for attempt in itertools.count():
        pipe = redis.pipeline(transaction=False)  # a failed execute() empties a pipeline
        for _, key, value in encoded:
            pipe.setex(key, backend.expires, value)
            pipe.publish(key, value)
        if reply_to and encoded:
            pipe.publish(reply_to, reply_message([(j, v) for j, _, v in encoded]))
        try:
            pipe.execute()
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            pause = backoff.exponential(attempt, 0.1, 2.0, backoff.SPREAD)
            if time.monotonic() + pause > give_up:
                raise
            logger.warning("storing %d results failed (%s); retrying in %.1f s", len(items),
                           exc, pause, extra={"event": "store_retry",
                                              "job_ids": [i[0] for i in items],
                                              "retry_in_s": round(pause, 3)})
            time.sleep(pause)


def store_expired(app: Celery, jobs: list[tuple[str, float]], reply_to: str | None = None
                  ) -> None:
    """(job id, deadline) of jobs whose deadline passed before they ran: stored final as
    ``expired``; they are not run."""
    now = time.time()
    store_many(app, [(j, EXPIRED_STATE, {"deadline": deadline, "expired_at": now})
                     for j, deadline in jobs], reply_to)


def register_many(app: Celery, pool: ModelPool, intake: Intake) -> None:
    many = ManyJobs(app, pool, intake)

    @app.task(name=INFER_MANY_TASK, bind=True, ignore_result=True)
    def infer_many(self: Any, model: str, jobs: list[dict[str, Any]],
                   version: int | None = None, variant: str | None = None,
                   reply_to: str | None = None) -> None:
        spans = tracing.start_jobs(self.request, jobs, model)
        # How each job ended, for its span, keyed by id() of its dict (ids are the
        # sender's: a malformed message may repeat one). Unset: ok.
        outcomes: dict[int, str] = {}
        try:
            many.run_message(self, spans, outcomes, model, jobs, version, variant, reply_to)
        except Reject:  # back on the queue: the jobs run again
            tracing.end(spans, "requeued")
            raise
        except BaseException as exc:
            tracing.end(spans, error=exc)
            raise
        if spans:
            tracing.end(spans, [outcomes.get(id(j), "ok") for j in jobs])


@dataclass
class _Message:
    """One ``inferq.infer_many`` message on its way through ``ManyJobs``."""

    task: Any
    model: str
    jobs: list[dict[str, Any]]  # as sent
    version: int | None
    variant: str | None
    reply_to: str | None
    started: float
    sent: Sent  # the jobs' claims (``Intake.send_claims``)
    delivery: Delivery | None  # its earlier delivery, if the broker delivered it before
    span_of: dict[int, Any]  # each traced job's span, by id() of its dict
    outcomes: dict[int, str]  # how the jobs that did not simply succeed ended, likewise

    def late(self, job: dict[str, Any]) -> bool:
        return job.get("deadline") is not None and self.started > job["deadline"]


class ManyJobs:
    """``inferq.infer_many``'s steps: each job admitted (workers/intake.py) and checked
    on its own, their valid rows run as one batcher submit, every result stored at once.

    On a first delivery the rows run while the jobs' claims travel, and the claims are
    read before anything is stored: a job cancelled first is dropped then, its run unseen
    (one round trip less per message; docs/design.md, "What a request costs"). A
    redelivered message reads its claims first: its rows run one by one."""

    def __init__(self, app: Celery, pool: ModelPool, intake: Intake):
        self.app, self.pool, self.intake = app, pool, intake

    def run_message(self, task: Any, spans: list[Any] | None, outcomes: dict[int, str],
                    model: str, jobs: list[dict[str, Any]], version: int | None,
                    variant: str | None, reply_to: str | None) -> None:
        started = time.time()
        sent, delivery = self.intake.send_claims(task.request, [j["id"] for j in jobs])
        span_of = {} if not spans else {id(j): s for j, s in zip(jobs, spans, strict=True)}
        m = _Message(task, model, jobs, version, variant, reply_to, started, sent, delivery,
                     span_of, outcomes)
        runnable = jobs
        if delivery is not None:
            runnable = self._admitted(m)
            reason = self.intake.too_often(delivery, task.name, model,
                                           [j["id"] for j in runnable])
            if reason is not None:
                store_many(self.app, [(j["id"], states.FAILURE, DeadLettered(reason))
                                      for j in runnable], reply_to)
                outcomes.update({id(j): "dead_lettered" for j in runnable})
                return
        try:
            self.run_jobs(m, runnable)
        except Reject:  # the result store is away: back on the queue, run again later
            raise
        except Exception as exc:  # every job still unanswered gets this error, not silence
            self._fail_all(m, exc)

    def _admitted(self, m: _Message) -> list[dict[str, Any]]:
        """The claimed jobs (cancelled ones skipped) whose deadline has not passed (the
        others are stored ``expired``)."""
        taken = self.intake.taken(m.sent, m.task.request)
        return self._expire(m, self._skip_cancelled(m, taken))

    def _skip_cancelled(self, m: _Message, taken: list[bool]) -> list[dict[str, Any]]:
        runnable = [j for j, ok in zip(m.jobs, taken, strict=True) if ok]
        if len(runnable) == len(m.jobs):
            return runnable
        skipped = [j for j, ok in zip(m.jobs, taken, strict=True) if not ok]
        m.outcomes.update({id(j): "cancelled" for j in skipped})
        for _ in skipped:
            self.pool.metrics.job(m.model, "cancelled", None, m.started)
        ids = [j["id"] for j in skipped]
        request = m.task.request
        logger.info("message %s: %d of %d jobs cancelled before they ran; skipped: %s",
                    request.id, len(ids), len(m.jobs),
                    " ".join(ids[:8]) + (" …" if len(ids) > 8 else ""),
                    extra={"event": "jobs_skipped", "message_id": request.id,
                           "model": m.model, "worker": request.hostname, "job_ids": ids})
        return runnable

    def _expire(self, m: _Message, runnable: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Jobs whose deadline passed are stored ``expired``; -> the others."""
        expired = [j for j in runnable if m.late(j)]
        if not expired:
            return runnable
        store_expired(self.app, [(j["id"], j["deadline"]) for j in expired], m.reply_to)
        for job in expired:
            self.pool.metrics.job(m.model, "expired", job.get("submitted_at"), m.started)
            m.outcomes[id(job)] = "expired"
        return [j for j in runnable if not m.late(j)]

    def _fail_all(self, m: _Message, exc: Exception) -> None:
        taken = self.intake.taken(m.sent, m.task.request)
        runnable = [j for j, ok in zip(m.jobs, taken, strict=True)
                    if ok and m.outcomes.get(id(j)) not in ("cancelled", "expired")]
        m.outcomes.update({id(j): "failed" for j in runnable})
        ids = [j["id"] for j in runnable]
        request = m.task.request
        logger.exception("message %s: %d jobs failed", request.id, len(runnable),
                         extra={"event": "message_failed", "message_id": request.id,
                                "model": m.model, "version": m.version,
                                "worker": request.hostname, "job_ids": ids,
                                "duration_s": round(time.time() - m.started, 6)})
        try:
            store_many(self.app, [(j, states.FAILURE, exc) for j in ids], m.reply_to)
        except Exception:  # not even the failures can be stored: run it all again
            logger.exception("message %s: storing the failures failed; requeued",
                             request.id, extra={
                                 "event": "message_requeued", "message_id": request.id,
                                 "model": m.model, "worker": request.hostname,
                                 "job_ids": ids})
            raise Reject(exc, requeue=True) from exc

    def run_jobs(self, m: _Message, jobs: list[dict[str, Any]]) -> None:
        """Check, run and store ``jobs``: on a first delivery, those not late, their
        claims read once the rows ran; on a redelivery, the admitted ones."""
        served = self.pool.get(m.model, m.version, m.variant)
        first = m.delivery is None
        checked, invalid, merged, sizes, future = self._submit(
            served, [j for j in jobs if not m.late(j)] if first else jobs, m)
        outcome = None if future is None else \
            future.result(timeout=self.pool.settings.visibility_timeout)
        admitted = {id(j) for j in (self._admitted(m) if first else jobs)}
        if checked and not first:
            assert m.delivery is not None
            outcome = self.intake.run_suspect(served, merged, m.delivery,
                                              _describe(checked, sizes))
        items: list[tuple[str, str, Any]] = []
        for job, exc in invalid:
            if id(job) in admitted:
                items.append((job["id"], states.FAILURE, exc))
                self.pool.metrics.job(m.model, "failed", job.get("submitted_at"), m.started)
                m.outcomes[id(job)] = "invalid"
        parts = [] if outcome is None else _split(outcome, sizes)
        for (job, _, keep, labels, errors), part in zip(checked, parts, strict=True):
            if id(job) not in admitted:
                continue
            result = finish(served, part, keep, labels, errors, job.get("submitted_at"),
                            m.started, m.task.request.hostname, self.pool.metrics)
            items.append((job["id"], states.SUCCESS, result))
            if not result["ok"].all():
                m.outcomes[id(job)] = "rows_failed"
        store_many(self.app, items, m.reply_to)
        if m.delivery is not None:
            self.intake.done(m.delivery.message_id)

    def _submit(self, served: Served, jobs: list[dict[str, Any]], m: _Message
                ) -> tuple[list[tuple], list[tuple[dict[str, Any], InferqError]],
                           dict[str, np.ndarray], list[int], Any]:
        """Each job's rows checked (a job with a bad input fails alone); the valid rows
        merged and, on a first delivery, handed to the batcher as one submit -> (checked
        jobs, invalid jobs with their error, merged rows, rows per checked job, the
        batcher's future or None)."""
        manifest = served.version.manifest
        checked: list[tuple] = []
        invalid: list[tuple[dict[str, Any], InferqError]] = []
        merged: dict[str, np.ndarray] = {}
        future = None
        with served.batcher.announced() as ticket:
            for job in jobs:
                try:
                    checked.append((job, *validate(manifest, job["inputs"], 0, None)))
                except InferqError as exc:
                    invalid.append((job, exc))
            sizes = [len(c[2]) for c in checked]  # each job's valid rows, in merged order
            if checked:
                names = checked[0][1].keys()
                merged = {k: np.concatenate([c[1][k] for c in checked]) for k in names}
                served.observe(merged)
                if m.delivery is None:
                    linked = () if not m.span_of else tracing.links(
                        [m.span_of[id(c[0])] for c in checked], sizes)
                    future = served.batcher.submit(merged, ticket, linked, here=True)
        return checked, invalid, merged, sizes, future


def _describe(checked: list[tuple], sizes: list[int]) -> Any:
    """Merged row i -> the job and row label it came from (for a poison row's report)."""
    owner = np.repeat(np.arange(len(checked)), sizes)
    starts = np.cumsum([0, *sizes])

    def describe(i: int) -> dict[str, Any]:
        job, _, keep, labels, _ = checked[owner[i]]
        return {"jobs": [job["id"]], "rows": [int(labels[keep[i - starts[owner[i]]]])]}

    return describe
