"""The job record: what the result store holds for one job, written and read only here.

It is Celery's result meta (``{"status", "result", "traceback", "children", "date_done",
"task_id"}`` under ``celery-task-meta-<id>``), so Celery's own tools and ``AsyncResult``
read it too. Its ``status`` is Celery's state or one of inferq's (``CANCELLED``,
``EXPIRED``); its ``result`` is, by state:

- queued (``PENDING``): ``{"model", "submitted_at"}``, written before the job is sent;
- ``SUCCESS``: the task's result: ``model``, ``version``, ``variant``, ``rows``,
  ``outputs``, ``ok``, ``errors`` (one per failed row), ``batch_rows``, ``truncated``,
  ``submitted_at``, ``started_at``, ``finished_at``, ``worker`` (workers/job_rows.py);
- ``FAILURE``: the exception;
- ``CANCELLED``: the queued record plus ``cancelled_at``;
- ``EXPIRED``: ``{"deadline", "expired_at"}``.

A job whose every row failed in the worker is stored ``SUCCESS`` (the task ran) but
reads as ``failed`` through the SDK and the API alike (``every_row_failed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from celery import states

from shared.claims import CANCELLED_STATE, EXPIRED_STATE
from shared.errors import JobCancelled, JobExpired
from shared.schemas import JobResult, JobStatus, RowError

_STATUS = {
    states.PENDING: JobStatus.queued,
    states.RECEIVED: JobStatus.queued,
    states.STARTED: JobStatus.running,
    states.RETRY: JobStatus.retrying,
    states.SUCCESS: JobStatus.succeeded,
    states.FAILURE: JobStatus.failed,
    states.REVOKED: JobStatus.failed,
    CANCELLED_STATE: JobStatus.cancelled,
    EXPIRED_STATE: JobStatus.expired,
}

FINAL_STATES = states.READY_STATES | {CANCELLED_STATE, EXPIRED_STATE}


@dataclass(frozen=True)
class JobRecord:
    """One job's record, to be stored (``encode``) or as read back (``decode``)."""

    job_id: str
    state: str
    result: Any
    date_done: str | None = None

    @classmethod
    def queued(cls, job_id: str, model: str, submitted_at: float) -> JobRecord:
        return cls(job_id, states.PENDING, {"model": model, "submitted_at": submitted_at})

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> JobRecord:
        return cls(str(meta.get("task_id", "")), meta.get("status", states.PENDING),
                   meta.get("result"), meta.get("date_done"))

    def meta(self, backend: Any = None) -> dict[str, Any]:
        """Celery's result dict; with ``backend``, the result as that backend stores it
        (an exception in its serializable form)."""
        result = self.result if backend is None else \
            backend.encode_result(self.result, self.state)
        return {"status": self.state, "result": result, "traceback": None, "children": [],
                "date_done": self.date_done, "task_id": self.job_id}

    def encode(self, backend: Any) -> bytes | str:
        """The stored value, as Celery's backend writes it (bytes with inferq's result
        serializer, text with JSON)."""
        value: bytes | str = backend.encode(self.meta(backend))
        return value


def reply_message(records: list[tuple[str, bytes | str]]) -> bytes:
    """Several jobs' encoded records as one message on a producer's reply channel
    (workers publish it beside each record's own key; producer/waiter.py reads it)."""
    return bytes(msgpack.packb(records, use_bin_type=True))


def read_reply(data: bytes) -> list[tuple[str, bytes]]:
    """``reply_message``'s (job id, encoded record) pairs; anything else published on the
    channel yields none (ValueError when it is not even msgpack)."""
    try:
        items = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several kinds
        raise ValueError(f"not a reply message ({type(exc).__name__})") from None
    if not isinstance(items, list):
        return []
    return [(item[0], item[1]) for item in items
            if isinstance(item, list | tuple) and len(item) == 2
            and isinstance(item[0], str) and isinstance(item[1], bytes)]


def status_of(meta: dict[str, Any]) -> JobStatus:
    """The status of the stored state (``to_result`` and the API's view also turn a
    finished job whose every row failed into ``failed``)."""
    return _STATUS.get(meta.get("status", states.PENDING), JobStatus.queued)


def is_final(meta: dict[str, Any] | None) -> bool:
    return meta is not None and meta.get("status") in FINAL_STATES


def every_row_failed(value: Any) -> str | None:
    """A finished job's result whose rows all failed in the worker -> their messages, one
    line (such a job is ``failed``, through the SDK and the API alike); else None."""
    if not isinstance(value, dict):
        return None
    errors = value.get("errors") or []
    if not errors or len(errors) < int(value.get("rows", 0) or 0):
        return None
    return "; ".join(str(e.get("message")) for e in errors)


def result_value(meta: dict[str, Any] | None) -> Any:
    """A final job's result: the task's return value, its exception, JobCancelled or
    JobExpired."""
    meta = meta or {}
    if meta.get("status") == CANCELLED_STATE:
        return JobCancelled("cancelled before it ran")
    if meta.get("status") == EXPIRED_STATE:
        return JobExpired("its deadline passed before a worker started it; not run")
    return meta.get("result")


def to_result(job_id: str, meta: dict[str, Any]) -> JobResult:
    """The record as the SDK's ``JobResult``."""
    status = status_of(meta)
    value = meta.get("result")
    res = JobResult(job_id=job_id, status=status)
    if isinstance(value, BaseException) or status is JobStatus.failed:
        res.error = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) \
            else str(value)
        return res
    if isinstance(value, dict):
        _fill(res, value, meta)
    return res


def _fill(res: JobResult, value: dict[str, Any], meta: dict[str, Any]) -> None:
    res.model = value.get("model")
    res.version = value.get("version")
    res.variant = value.get("variant")
    res.submitted_at = value.get("submitted_at")
    res.started_at = value.get("started_at")
    res.worker = value.get("worker")
    if res.status is JobStatus.cancelled:
        res.error = "cancelled before it ran"
        res.finished_at = value.get("cancelled_at")
    elif res.status is JobStatus.expired:
        res.error = (f"expired: its deadline ({value.get('deadline')}) passed before a "
                     "worker started it; not run")
        res.finished_at = value.get("expired_at")
    elif is_final(meta):
        res.outputs = value.get("outputs")
        res.errors = [RowError(**{k: e.get(k) for k in ("row", "field", "message")})
                      for e in value.get("errors", [])]
        res.batch_rows = list(value.get("batch_rows", []))
        res.truncated = list(value.get("truncated", []))
        res.finished_at = value.get("finished_at")
        if (every_failed := every_row_failed(value)) is not None:
            res.status, res.error = JobStatus.failed, every_failed
