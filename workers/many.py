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
import random
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from celery import Celery, states
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import tracing
from shared.celery_app import INFER_MANY_TASK
from shared.claims import EXPIRED_STATE, Claims, redis_of
from shared.errors import DeadLettered, InferqError
from workers.batcher import Outcome
from workers.deliveries import (
    STORE_DOWN,
    Deliveries,
    Delivery,
    dead_letter_message,
    give_back,
    run_suspect,
)
from workers.pool import ModelPool

logger = logging.getLogger(__name__)

Validate = Callable[..., tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list]]
Finish = Callable[..., dict[str, Any]]


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
        meta = {"status": state, "result": backend.encode_result(result, state),
                "traceback": None, "children": [], "date_done": done, "task_id": job_id}
        encoded.append((job_id, backend.get_key_for_task(job_id), backend.encode(meta)))
    give_up = time.monotonic() + patience_s
    for attempt in itertools.count():
        pipe = redis.pipeline(transaction=False)  # a failed execute() empties a pipeline
        for _, key, value in encoded:
            pipe.setex(key, backend.expires, value)
            pipe.publish(key, value)
        if reply_to and encoded:
            pipe.publish(reply_to, msgpack.packb([(j, v) for j, _, v in encoded],
                                                 use_bin_type=True))
        try:
            pipe.execute()
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            pause = min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.5)
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


def register_many(app: Celery, pool: ModelPool, claims: Claims,
                  deliveries: Deliveries | None, validate: Validate, finish: Finish) -> None:
    """``validate`` and ``finish`` are ``inferq.infer``'s own steps (workers/tasks.py)."""

    @app.task(name=INFER_MANY_TASK, bind=True, ignore_result=True)
    def infer_many(self: Any, model: str, jobs: list[dict[str, Any]],
                   version: int | None = None, variant: str | None = None,
                   reply_to: str | None = None) -> None:
        spans = tracing.start_jobs(self.request, jobs, model)
        # How each job ended, for its span, keyed by id() of its dict (ids are the
        # sender's: a malformed message may repeat one). Unset: ok.
        outcomes: dict[int, str] = {}
        try:
            run_message(self, spans, outcomes, model, jobs, version, variant, reply_to)
        except Reject:  # back on the queue: the jobs run again
            tracing.end(spans, "requeued")
            raise
        except BaseException as exc:
            tracing.end(spans, error=exc)
            raise
        if spans:
            tracing.end(spans, [outcomes.get(id(j), "ok") for j in jobs])

    def run_message(self: Any, spans: list[Any] | None, outcomes: dict[int, str],
                    model: str, jobs: list[dict[str, Any]], version: int | None,
                    variant: str | None, reply_to: str | None) -> None:
        started = time.time()
        try:
            taken = claims.take_many([j["id"] for j in jobs])
            delivery = None if deliveries is None else deliveries.redelivery(self.request)
        except STORE_DOWN as exc:
            raise give_back(exc, self.request.id) from exc
        runnable = [j for j, ok in zip(jobs, taken, strict=True) if ok]
        span_of = {} if not spans else {id(j): s for j, s in zip(jobs, spans, strict=True)}
        outcomes.update({id(j): "cancelled" for j, ok in zip(jobs, taken, strict=True)
                         if not ok})
        if len(runnable) < len(jobs):
            for _ in range(len(jobs) - len(runnable)):
                pool.metrics.job(model, "cancelled", None, started)
            skipped = [j["id"] for j, ok in zip(jobs, taken, strict=True) if not ok]
            logger.info("message %s: %d of %d jobs cancelled before they ran; skipped: %s",
                        self.request.id, len(skipped), len(jobs),
                        " ".join(skipped[:8]) + (" …" if len(skipped) > 8 else ""),
                        extra={"event": "jobs_skipped", "message_id": self.request.id,
                               "model": model, "worker": self.request.hostname,
                               "job_ids": skipped})
        late = [j.get("deadline") is not None and started > j["deadline"] for j in runnable]
        expired = [j for j, past in zip(runnable, late, strict=True) if past]
        if expired:
            runnable = [j for j, past in zip(runnable, late, strict=True) if not past]
            store_expired(app, [(j["id"], j["deadline"]) for j in expired], reply_to)
            for job in expired:
                pool.metrics.job(model, "expired", job.get("submitted_at"), started)
                outcomes[id(job)] = "expired"
        if delivery is not None:
            assert deliveries is not None
            pool.metrics.redelivered(model)
            if deliveries.too_many(delivery):
                reason = dead_letter_message(deliveries, pool, delivery, self.name, model,
                                             [j["id"] for j in runnable])
                store_many(app, [(j["id"], states.FAILURE, DeadLettered(reason))
                                 for j in runnable], reply_to)
                outcomes.update({id(j): "dead_lettered" for j in runnable})
                return
        try:
            run_jobs(runnable, model, version, variant, started, self.request.hostname,
                     reply_to, delivery, span_of, outcomes)
        except Exception as exc:  # every job still unanswered gets this error, not silence
            outcomes.update({id(j): "failed" for j in runnable})
            logger.exception("message %s: %d jobs failed", self.request.id, len(runnable),
                             extra={"event": "message_failed", "message_id": self.request.id,
                                    "model": model, "version": version,
                                    "worker": self.request.hostname,
                                    "job_ids": [j["id"] for j in runnable],
                                    "duration_s": round(time.time() - started, 6)})
            try:
                store_many(app, [(j["id"], states.FAILURE, exc) for j in runnable], reply_to)
            except Exception:  # not even the failures can be stored: run it all again
                logger.exception("message %s: storing the failures failed; requeued",
                                 self.request.id, extra={
                                     "event": "message_requeued",
                                     "message_id": self.request.id, "model": model,
                                     "worker": self.request.hostname,
                                     "job_ids": [j["id"] for j in runnable]})
                raise Reject(exc, requeue=True) from exc

    def run_jobs(runnable: list[dict[str, Any]], model: str, version: int | None,
                 variant: str | None, started: float, hostname: str | None,
                 reply_to: str | None, delivery: Delivery | None,
                 span_of: dict[int, Any], outcomes: dict[int, str]) -> None:
        """``span_of``: each traced job's span, by id() of its dict; ``outcomes`` gets
        how the jobs that did not simply succeed ended."""
        items: list[tuple[str, str, Any]] = []
        served = pool.get(model, version, variant)
        manifest = served.version.manifest
        checked = []
        with served.batcher.announced() as ticket:
            for job in runnable:
                try:
                    checked.append((job, *validate(manifest, job["inputs"], 0, None)))
                except InferqError as exc:
                    items.append((job["id"], states.FAILURE, exc))
                    pool.metrics.job(manifest.name, "failed", job.get("submitted_at"), started)
                    outcomes[id(job)] = "invalid"
            sizes = [len(c[2]) for c in checked]  # each job's valid rows, in merged order
            if checked:
                names = checked[0][1].keys()
                merged = {k: np.concatenate([c[1][k] for c in checked]) for k in names}
                served.observe(merged)
                if delivery is None:
                    linked = () if not span_of else tracing.links(
                        [span_of[id(c[0])] for c in checked], sizes)
                    future = served.batcher.submit(merged, ticket, linked)
        if checked:
            if delivery is None:
                outcome = future.result(timeout=pool.settings.visibility_timeout)
            else:
                assert deliveries is not None
                owner = np.repeat(np.arange(len(checked)), sizes)
                starts = np.cumsum([0, *sizes])

                def describe(i: int) -> dict[str, Any]:
                    job, _, keep, labels, _ = checked[owner[i]]
                    return {"jobs": [job["id"]],
                            "rows": [int(labels[keep[i - starts[owner[i]]]])]}

                outcome = run_suspect(deliveries, pool, served, merged, delivery, describe)
            for (job, _, keep, labels, errors), part in zip(checked, _split(outcome, sizes),
                                                            strict=True):
                result = finish(served, part, keep, labels, errors, job.get("submitted_at"),
                                started, hostname, pool.metrics)
                items.append((job["id"], states.SUCCESS, result))
                if not result["ok"].all():
                    outcomes[id(job)] = "rows_failed"
        store_many(app, items, reply_to)
        if delivery is not None:
            assert deliveries is not None
            deliveries.done(delivery.message_id)
