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
from typing import Any

import numpy as np
from celery import Celery, states
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import backoff, tracing
from shared.celery_app import INFER_MANY_TASK
from shared.claims import EXPIRED_STATE, redis_of
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


class ManyJobs:
    """``inferq.infer_many``'s steps: each job admitted (workers/intake.py) and checked
    on its own, their valid rows run as one batcher submit, every result stored at once."""

    def __init__(self, app: Celery, pool: ModelPool, intake: Intake):
        self.app, self.pool, self.intake = app, pool, intake

    def run_message(self, task: Any, spans: list[Any] | None, outcomes: dict[int, str],
                    model: str, jobs: list[dict[str, Any]], version: int | None,
                    variant: str | None, reply_to: str | None) -> None:
        started = time.time()
        taken, delivery = self.intake.take(task.request, [j["id"] for j in jobs])
        span_of = {} if not spans else {id(j): s for j, s in zip(jobs, spans, strict=True)}
        runnable = self._skip_cancelled(task, model, jobs, taken, outcomes, started)
        runnable = self._expire(model, runnable, outcomes, started, reply_to)
        reason = self.intake.too_often(delivery, task.name, model,
                                       [j["id"] for j in runnable])
        if reason is not None:
            store_many(self.app, [(j["id"], states.FAILURE, DeadLettered(reason))
                                  for j in runnable], reply_to)
            outcomes.update({id(j): "dead_lettered" for j in runnable})
            return
        try:
            self.run_jobs(runnable, model, version, variant, started, task.request.hostname,
                          reply_to, delivery, span_of, outcomes)
        except Exception as exc:  # every job still unanswered gets this error, not silence
            self._fail_all(task, model, version, runnable, exc, outcomes, started, reply_to)

    def _skip_cancelled(self, task: Any, model: str, jobs: list[dict[str, Any]],
                        taken: list[bool], outcomes: dict[int, str], started: float
                        ) -> list[dict[str, Any]]:
        runnable = [j for j, ok in zip(jobs, taken, strict=True) if ok]
        if len(runnable) == len(jobs):
            return runnable
        skipped = [j for j, ok in zip(jobs, taken, strict=True) if not ok]
        outcomes.update({id(j): "cancelled" for j in skipped})
        for _ in skipped:
            self.pool.metrics.job(model, "cancelled", None, started)
        ids = [j["id"] for j in skipped]
        logger.info("message %s: %d of %d jobs cancelled before they ran; skipped: %s",
                    task.request.id, len(ids), len(jobs),
                    " ".join(ids[:8]) + (" …" if len(ids) > 8 else ""),
                    extra={"event": "jobs_skipped", "message_id": task.request.id,
                           "model": model, "worker": task.request.hostname, "job_ids": ids})
        return runnable

    def _expire(self, model: str, runnable: list[dict[str, Any]], outcomes: dict[int, str],
                started: float, reply_to: str | None) -> list[dict[str, Any]]:
        """Jobs whose deadline passed are stored ``expired``; -> the others."""
        late = [j.get("deadline") is not None and started > j["deadline"] for j in runnable]
        expired = [j for j, past in zip(runnable, late, strict=True) if past]
        if not expired:
            return runnable
        store_expired(self.app, [(j["id"], j["deadline"]) for j in expired], reply_to)
        for job in expired:
            self.pool.metrics.job(model, "expired", job.get("submitted_at"), started)
            outcomes[id(job)] = "expired"
        return [j for j, past in zip(runnable, late, strict=True) if not past]

    def _fail_all(self, task: Any, model: str, version: int | None,
                  runnable: list[dict[str, Any]], exc: Exception, outcomes: dict[int, str],
                  started: float, reply_to: str | None) -> None:
        outcomes.update({id(j): "failed" for j in runnable})
        ids = [j["id"] for j in runnable]
        logger.exception("message %s: %d jobs failed", task.request.id, len(runnable),
                         extra={"event": "message_failed", "message_id": task.request.id,
                                "model": model, "version": version,
                                "worker": task.request.hostname, "job_ids": ids,
                                "duration_s": round(time.time() - started, 6)})
        try:
            store_many(self.app, [(j, states.FAILURE, exc) for j in ids], reply_to)
        except Exception:  # not even the failures can be stored: run it all again
            logger.exception("message %s: storing the failures failed; requeued",
                             task.request.id, extra={
                                 "event": "message_requeued", "message_id": task.request.id,
                                 "model": model, "worker": task.request.hostname,
                                 "job_ids": ids})
            raise Reject(exc, requeue=True) from exc

    def run_jobs(self, runnable: list[dict[str, Any]], model: str, version: int | None,
                 variant: str | None, started: float, hostname: str | None,
                 reply_to: str | None, delivery: Delivery | None,
                 span_of: dict[int, Any], outcomes: dict[int, str]) -> None:
        """``span_of``: each traced job's span, by id() of its dict; ``outcomes`` gets
        how the jobs that did not simply succeed ended."""
        items: list[tuple[str, str, Any]] = []
        served = self.pool.get(model, version, variant)
        checked, merged, sizes, future = self._submit(served, runnable, started, delivery,
                                                      span_of, outcomes, items)
        if checked:
            if delivery is None:
                outcome = future.result(timeout=self.pool.settings.visibility_timeout)
            else:
                outcome = self.intake.run_suspect(served, merged, delivery,
                                                  _describe(checked, sizes))
            for (job, _, keep, labels, errors), part in zip(checked, _split(outcome, sizes),
                                                            strict=True):
                result = finish(served, part, keep, labels, errors, job.get("submitted_at"),
                                started, hostname, self.pool.metrics)
                items.append((job["id"], states.SUCCESS, result))
                if not result["ok"].all():
                    outcomes[id(job)] = "rows_failed"
        store_many(self.app, items, reply_to)
        if delivery is not None:
            self.intake.done(delivery.message_id)

    def _submit(self, served: Served, runnable: list[dict[str, Any]], started: float,
                delivery: Delivery | None, span_of: dict[int, Any],
                outcomes: dict[int, str], items: list[tuple[str, str, Any]]
                ) -> tuple[list[tuple], dict[str, np.ndarray], list[int], Any]:
        """Each job's rows checked (a job with a bad input fails alone, into ``items``);
        the valid rows merged and, unless redelivered, handed to the batcher as one
        submit -> (checked jobs, merged rows, rows per job, the batcher's future)."""
        manifest = served.version.manifest
        checked: list[tuple] = []
        merged: dict[str, np.ndarray] = {}
        future = None
        with served.batcher.announced() as ticket:
            for job in runnable:
                try:
                    checked.append((job, *validate(manifest, job["inputs"], 0, None)))
                except InferqError as exc:
                    items.append((job["id"], states.FAILURE, exc))
                    self.pool.metrics.job(manifest.name, "failed", job.get("submitted_at"),
                                          started)
                    outcomes[id(job)] = "invalid"
            sizes = [len(c[2]) for c in checked]  # each job's valid rows, in merged order
            if checked:
                names = checked[0][1].keys()
                merged = {k: np.concatenate([c[1][k] for c in checked]) for k in names}
                served.observe(merged)
                if delivery is None:
                    linked = () if not span_of else tracing.links(
                        [span_of[id(c[0])] for c in checked], sizes)
                    future = served.batcher.submit(merged, ticket, linked, here=True)
        return checked, merged, sizes, future


def _describe(checked: list[tuple], sizes: list[int]) -> Any:
    """Merged row i -> the job and row label it came from (for a poison row's report)."""
    owner = np.repeat(np.arange(len(checked)), sizes)
    starts = np.cumsum([0, *sizes])

    def describe(i: int) -> dict[str, Any]:
        job, _, keep, labels, _ = checked[owner[i]]
        return {"jobs": [job["id"]], "rows": [int(labels[keep[i - starts[owner[i]]]])]}

    return describe
