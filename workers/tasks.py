"""The Celery task every job runs: validate, hand rows to the batcher, return one result."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject
from celery.worker.control import inspect_command

from shared import tracing
from shared.celery_app import INFER_TASK
from shared.errors import DeadLettered, InferqError
from workers.deliveries import Delivery
from workers.intake import Intake
from workers.job_rows import finish, validate
from workers.many import register_many, store_expired
from workers.pool import ModelPool, Served

logger = logging.getLogger(__name__)


def register_tasks(app: Celery, pool: ModelPool) -> None:
    intake = Intake(app, pool)
    single = SingleJob(app, pool, intake)

    @app.task(name=INFER_TASK, bind=True, resultrepr_maxsize=160)
    def infer(self: Any, model: str, inputs: Any, version: int | None = None,
              variant: str | None = None, first_row: int = 0, row_ids: Any = None,
              submitted_at: float | None = None, deadline: float | None = None
              ) -> dict[str, Any]:
        spans = tracing.start_jobs(self.request, [self.request.id], model)
        how: dict[str, str] = {}  # how it ended, where not plainly (its span's outcome)
        try:
            result = single.run(self, spans, how, model, inputs, version, variant,
                                first_row, row_ids, submitted_at, deadline)
        except (Ignore, Reject):  # not run (cancelled, expired), or back on the queue
            tracing.end(spans, how.get("outcome", "requeued"))
            raise
        except BaseException as exc:
            tracing.end(spans, how.get("outcome", "failed"), error=exc)
            raise
        if spans is not None:
            tracing.end(spans, "ok" if result["ok"].all() else "rows_failed")
        return result

    register_many(app, pool, intake)

    @inspect_command(name="inferq_stats")
    def inferq_stats(state: Any) -> dict[str, Any]:
        """Model calls and rows per model version in this worker process."""
        return pool.stats()

    @inspect_command(name="inferq_drift")
    def inferq_drift(state: Any) -> dict[str, Any]:
        """Input drift counts per model version in this worker process (workers/drift.py)."""
        return pool.drift_states()


class SingleJob:
    """``inferq.infer``'s steps: admitted (workers/intake.py), rows checked, run in the
    batcher with other jobs' rows, its result assembled (workers/job_rows.py)."""

    def __init__(self, app: Celery, pool: ModelPool, intake: Intake):
        self.app, self.pool, self.intake = app, pool, intake

    def run(self, task: Any, spans: list[Any] | None, how: dict[str, str], model: str,
            inputs: Any, version: int | None, variant: str | None, first_row: int,
            row_ids: Any, submitted_at: float | None, deadline: float | None
            ) -> dict[str, Any]:
        started = time.time()
        job_id = task.request.id
        delivery = self._admit(task, how, model, submitted_at, deadline, started)
        served = self.pool.get(model, version, variant)
        with served.batcher.announced() as ticket:
            try:
                data, keep, labels, errors = validate(served.version.manifest, inputs,
                                                      first_row, row_ids)
            except InferqError:
                self.pool.metrics.job(model, "failed", submitted_at, started)
                how["outcome"] = "invalid"
                raise
            served.observe(data)
            if delivery is None:
                future = served.batcher.submit(data, ticket, tracing.links(spans),
                                                here=True)
        if delivery is None:
            outcome = future.result(timeout=self.pool.settings.visibility_timeout)
        else:
            outcome = self.intake.run_suspect(served, data, delivery, lambda i: {
                "jobs": [job_id], "rows": [int(labels[keep[i]])]})
        if errors or outcome.errors:
            _log_failed_rows(task, served, len(errors) + len(outcome.errors), len(labels),
                             started)
        result = finish(served, outcome, keep, labels, errors, submitted_at, started,
                        task.request.hostname, self.pool.metrics)
        if delivery is not None:
            self.intake.done(job_id)
        return result

    def _admit(self, task: Any, how: dict[str, str], model: str,
               submitted_at: float | None, deadline: float | None, started: float
               ) -> Delivery | None:
        """Skipped when cancelled or expired (Ignore), dead-lettered when redelivered too
        often; -> the message's earlier delivery, if any."""
        job_id = task.request.id
        taken, delivery = self.intake.take(task.request, [job_id])
        if not taken[0]:
            logger.info("job %s model %s: cancelled before it ran; skipped", job_id, model,
                        extra={"event": "job_skipped", "job_id": job_id, "model": model,
                               "worker": task.request.hostname})
            self.pool.metrics.job(model, "cancelled", None, started)
            how["outcome"] = "cancelled"
            raise Ignore()  # acked; the cancel already stored the job's final state
        if deadline is not None and started > deadline:
            store_expired(self.app, [(job_id, deadline)])
            self.pool.metrics.job(model, "expired", submitted_at, started)
            how["outcome"] = "expired"
            raise Ignore()
        reason = self.intake.too_often(delivery, task.name, model, [job_id])
        if reason is not None:
            how["outcome"] = "dead_lettered"
            raise DeadLettered(reason)
        return delivery


def _log_failed_rows(task: Any, served: Served, failed: int, rows: int, started: float
                     ) -> None:
    version = served.version
    logger.info("job %s model %s: %d of %d rows failed", task.request.id, version.key,
                failed, rows, extra={"event": "rows_failed", "job_id": task.request.id,
                                     "model": version.manifest.name,
                                     "version": version.manifest.version,
                                     "worker": task.request.hostname, "rows": rows,
                                     "failed_rows": failed,
                                     "duration_s": round(time.time() - started, 6)})
