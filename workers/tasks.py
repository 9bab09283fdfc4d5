"""The Celery task every job runs: validate, hand rows to the batcher, return one result."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import numpy as np
from celery import Celery
from celery.exceptions import Ignore, Reject
from celery.worker.control import inspect_command

from shared import tracing
from shared.celery_app import INFER_TASK
from shared.claims import Claims, redis_of
from shared.errors import DeadLettered, InferqError, InputError
from shared.schemas import Manifest
from shared.validation import check_rows
from workers import rejects
from workers.batcher import Outcome
from workers.deliveries import (
    STORE_DOWN,
    Deliveries,
    dead_letter_message,
    give_back,
    run_suspect,
)
from workers.many import register_many, store_expired
from workers.metrics import WorkerMetrics
from workers.pool import ModelPool, Served

logger = logging.getLogger(__name__)


def _validate(manifest: Manifest, inputs: Any, first_row: int, row_ids: Any
              ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """-> (valid rows per input, their indices, the row labels, errors of the other rows).

    Rows are labelled ``first_row + i``, or by ``row_ids`` when the producer dropped
    rows (bad ones) from a block; errors carry both the label and the index in the message.
    """
    if not isinstance(inputs, dict):
        raise InputError("inputs must be a mapping of input name to array", field="inputs")
    rows: int | None = None
    labels: np.ndarray | None = None
    checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    errors: dict[int, dict[str, Any]] = {}
    for spec in manifest.inputs:
        if spec.name not in inputs:
            raise InputError(f"missing input {spec.name!r} (model {manifest.name} takes "
                             f"{[s.name for s in manifest.inputs]})", field=spec.name)
        value = inputs[spec.name]
        arr: Any = value if spec.dtype == "string" and isinstance(value, list) \
            else np.asarray(value)
        if rows is not None and len(arr) != rows:
            raise InputError(f"input {spec.name!r} has {len(arr)} rows, others {rows}",
                             field=spec.name)
        rows = len(arr) if isinstance(arr, list) or arr.ndim else 0
        if labels is None:
            labels = _labels(row_ids, first_row, rows)
        data, kept, errs = check_rows(spec, arr, first_row, labels=labels)
        checked[spec.name] = (data, kept)
        for e in errs:
            index = int(np.flatnonzero(labels == e.row)[0])
            errors.setdefault(index, {"index": index, **e.model_dump()})
    assert rows is not None and labels is not None
    keep = np.setdiff1d(np.arange(rows), np.array(list(errors), dtype=np.int64))
    valid = {name: data if len(kept) == len(keep) else data[np.searchsorted(kept, keep)]
             for name, (data, kept) in checked.items()}
    return valid, keep, labels, list(errors.values())


def _labels(row_ids: Any, first_row: int, rows: int) -> np.ndarray:
    if row_ids is None:
        return np.arange(first_row, first_row + rows)
    labels = np.asarray(row_ids)
    if labels.shape != (rows,) or labels.dtype.kind not in "iu":
        raise InputError(f"row_ids must be {rows} integers, got {labels.shape} "
                         f"{labels.dtype}", field="row_ids")
    return labels


def _assemble(manifest: Manifest, outcome: Outcome, keep: np.ndarray, labels: np.ndarray,
              errors: list[dict[str, Any]]) -> tuple[dict, np.ndarray]:
    rows = len(labels)
    ok = np.zeros(rows, dtype=bool)
    ok[keep] = True
    outputs: dict[str, np.ndarray] = {}
    for spec in manifest.outputs:
        got = None if outcome.outputs is None else outcome.outputs[spec.name]
        if got is not None and len(keep) == rows:
            outputs[spec.name] = got
            continue
        shape = got.shape[1:] if got is not None else [max(d, 1) for d in spec.row_shape]
        full = np.zeros((rows, *shape), got.dtype if got is not None else spec.np_dtype)
        if got is not None:
            full[keep] = got
        outputs[spec.name] = full
    for i, message in outcome.errors.items():
        index = int(keep[i])
        ok[index] = False
        row = int(labels[index])
        errors.append({"index": index, "row": row, "field": None,
                       "message": f"row {row}: {message}"})
    return outputs, ok


def _truncated(outcome: Outcome, keep: np.ndarray, labels: np.ndarray) -> list[int]:
    """Rows the runtime cut to the model's length limit (text), by row label."""
    flags = None if outcome.outputs is None else outcome.outputs.get("_truncated")
    if flags is None:
        return []
    return [int(labels[keep[i]]) for i in np.flatnonzero(flags)]


def finish(served: Served, outcome: Outcome, keep: np.ndarray, labels: np.ndarray,
           errors: list[dict[str, Any]], submitted_at: float | None, started: float,
           worker: str | None, metrics: WorkerMetrics | None = None) -> dict[str, Any]:
    """A job's stored result: outputs for every row, which rows failed and why, timings."""
    manifest = served.version.manifest
    outputs, ok = _assemble(manifest, outcome, keep, labels, errors)
    if metrics is not None:
        state = "succeeded" if ok.all() else "failed" if not ok.any() else "partial"
        metrics.job(manifest.name, state, submitted_at, started)
    return {
        "model": manifest.name, "version": manifest.version,
        "variant": manifest.variant, "rows": len(labels),
        "outputs": outputs, "ok": ok,
        "errors": sorted(errors, key=lambda e: e["index"]),
        "batch_rows": outcome.batch_rows, "submitted_at": submitted_at,
        "truncated": _truncated(outcome, keep, labels),
        "started_at": started, "finished_at": time.time(),
        "worker": worker or socket.gethostname(),
    }


def register_tasks(app: Celery, pool: ModelPool) -> None:
    settings = pool.settings
    claims = Claims(app.backend, settings.result_expires)
    redis = redis_of(app.backend)
    deliveries = None if redis is None else Deliveries(
        redis, expires=settings.result_expires, max_deliveries=settings.max_deliveries,
        queue_prefix=settings.queue_prefix)
    if deliveries is not None:
        dead = deliveries

        def on_dead(entry: dict[str, Any]) -> None:
            dead.dead_letter(entry)
            pool.metrics.dead_lettered(entry.get("model") or "unknown")

        rejects.install(app, on_dead)

    @app.task(name=INFER_TASK, bind=True, resultrepr_maxsize=160)
    def infer(self: Any, model: str, inputs: Any, version: int | None = None,
              variant: str | None = None, first_row: int = 0, row_ids: Any = None,
              submitted_at: float | None = None, deadline: float | None = None
              ) -> dict[str, Any]:
        spans = tracing.start_jobs(self.request, [self.request.id], model)
        how: dict[str, str] = {}  # how it ended, where not plainly (its span's outcome)
        try:
            result = run_job(self, spans, how, model, inputs, version, variant, first_row,
                             row_ids, submitted_at, deadline)
        except (Ignore, Reject):  # not run (cancelled, expired), or back on the queue
            tracing.end(spans, how.get("outcome", "requeued"))
            raise
        except BaseException as exc:
            tracing.end(spans, how.get("outcome", "failed"), error=exc)
            raise
        if spans is not None:
            tracing.end(spans, "ok" if result["ok"].all() else "rows_failed")
        return result

    def run_job(self: Any, spans: list[Any] | None, how: dict[str, str], model: str,
                inputs: Any, version: int | None, variant: str | None, first_row: int,
                row_ids: Any, submitted_at: float | None, deadline: float | None
                ) -> dict[str, Any]:
        started = time.time()
        job_id = self.request.id
        try:
            taken = claims.take(job_id)
            delivery = None if deliveries is None else deliveries.redelivery(self.request)
        except STORE_DOWN as exc:
            raise give_back(exc, job_id) from exc
        if not taken:
            logger.info("job %s model %s: cancelled before it ran; skipped", job_id, model,
                        extra={"event": "job_skipped", "job_id": job_id, "model": model,
                               "worker": self.request.hostname})
            pool.metrics.job(model, "cancelled", None, started)
            how["outcome"] = "cancelled"
            raise Ignore()  # acked; the cancel already stored the job's final state
        if deadline is not None and started > deadline:
            store_expired(app, [(job_id, deadline)])
            pool.metrics.job(model, "expired", submitted_at, started)
            how["outcome"] = "expired"
            raise Ignore()
        if delivery is not None:
            assert deliveries is not None
            pool.metrics.redelivered(model)
            if deliveries.too_many(delivery):
                how["outcome"] = "dead_lettered"
                raise DeadLettered(dead_letter_message(deliveries, pool, delivery, self.name,
                                                       model, [job_id]))
        served = pool.get(model, version, variant)
        with served.batcher.announced() as ticket:
            try:
                data, keep, labels, errors = _validate(served.version.manifest, inputs,
                                                       first_row, row_ids)
            except InferqError:
                pool.metrics.job(model, "failed", submitted_at, started)
                how["outcome"] = "invalid"
                raise
            served.observe(data)
            if delivery is None:
                future = served.batcher.submit(data, ticket, tracing.links(spans))
        if delivery is None:
            outcome = future.result(timeout=settings.visibility_timeout)
        else:
            assert deliveries is not None
            outcome = run_suspect(deliveries, pool, served, data, delivery, lambda i: {
                "jobs": [job_id], "rows": [int(labels[keep[i]])]})
        if errors or outcome.errors:
            logger.info("job %s model %s: %d of %d rows failed", job_id,
                        served.version.key, len(errors) + len(outcome.errors), len(labels),
                        extra={"event": "rows_failed", "job_id": job_id,
                               "model": served.version.manifest.name,
                               "version": served.version.manifest.version,
                               "worker": self.request.hostname, "rows": len(labels),
                               "failed_rows": len(errors) + len(outcome.errors),
                               "duration_s": round(time.time() - started, 6)})
        result = finish(served, outcome, keep, labels, errors, submitted_at, started,
                        self.request.hostname, pool.metrics)
        if deliveries is not None and delivery is not None:
            deliveries.done(job_id)
        return result

    register_many(app, pool, claims, deliveries, _validate, finish)

    @inspect_command(name="inferq_stats")
    def inferq_stats(state: Any) -> dict[str, Any]:
        """Model calls and rows per model version in this worker process."""
        return pool.stats()

    @inspect_command(name="inferq_drift")
    def inferq_drift(state: Any) -> dict[str, Any]:
        """Input drift counts per model version in this worker process (workers/drift.py)."""
        return pool.drift_states()
