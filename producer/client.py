"""The Python SDK: submit jobs, read them back from any process, score many rows."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from celery import Celery

from producer.chunks import check_fits
from producer.coalesce import Coalescer, not_sent
from producer.inflight import LOST_AFTER_S, MAX_RESENDS, InFlight, Sent
from producer.store import ResultStore, every_row_failed, is_final, status_of
from shared import tracing
from shared.catalog import open_for_clients
from shared.celery_app import INFER_TASK, check_priority, make_app, model_queue
from shared.errors import InputError
from shared.repository import ModelRef, ModelVersion, parse_model_ref
from shared.schemas import JobResult, JobStatus, Manifest, RowError
from shared.settings import Settings, load_settings
from shared.validation import as_row, check_rows, check_text_rows

if TYPE_CHECKING:
    from producer.bulk import BatchHandle

logger = logging.getLogger(__name__)

MODEL_TTL = 5.0  # seconds a resolved manifest is reused (the worker re-reads as often)

# Publishing retries while the broker is away (~25 s), then fails naming the job.
PUBLISH_RETRY = {"max_retries": 12, "interval_start": 0.1, "interval_step": 0.5,
                 "interval_max": 3.0}


class Client:
    """One per process; thread-safe for submit/get.

    ``Client()`` reads ``INFERQ_*`` settings; with no broker configured it talks to the
    embedded in-memory broker, which needs a worker in the same process
    (see ``workers.main.embedded_worker``).
    """

    def __init__(self, settings: Settings | None = None, app: Celery | None = None):
        self.settings = settings or load_settings()
        self.app = app or make_app(self.settings)
        self.repo = open_for_clients(self.settings)
        self.store = ResultStore(self.app)
        # With a Redis result store, workers also publish this process's results on its
        # own channel: a waiting job needs no subscription of its own (producer/waiter.py).
        self.reply_channel = (f"inferq-reply-{uuid.uuid4().hex}"
                              if self.store.claims.supported else None)
        self.coalescer = Coalescer(self, PUBLISH_RETRY, reply_to=self.reply_channel)
        self.inflight = InFlight()  # single jobs not waited for yet (producer/inflight.py)
        self._replies_ready = False
        self._models: dict[str, tuple[float, ModelVersion]] = {}

    def check_reachable(self, timeout: float = 2.0) -> None:
        """Unavailable, naming the service and its setting, when the broker or the result
        store does not answer within ``timeout``: one try, for a command's first step
        (Celery's own reconnect loop would retry for ~20 s, then raise a traceback)."""
        if self.settings.embedded:
            return
        import redis

        from shared.errors import Unavailable
        from shared.settings import scrub

        try:
            self.check_broker(timeout)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds for "not there"
            raise Unavailable(f"the broker at {scrub(self.settings.broker_url or '')} cannot "
                              f"be reached ({type(exc).__name__}: {scrub(str(exc))}); check "
                              "INFERQ_BROKER_URL and that the broker runs") from None
        backend = self.settings.effective_result_backend()
        if backend.startswith(("redis://", "rediss://")):
            store = redis.Redis.from_url(backend, socket_connect_timeout=timeout,
                                         socket_timeout=timeout)
            try:
                store.ping()
            except redis.RedisError as exc:
                raise Unavailable(f"the result store at {scrub(backend)} cannot be reached "
                                  f"({type(exc).__name__}: {scrub(str(exc))}); check "
                                  "INFERQ_RESULT_BACKEND (default: the broker URL)") from None
            finally:
                store.close()

    def check_broker(self, timeout: float = 2.0) -> None:
        """Connect to the broker once (not kombu's retry loop with its 2 s pauses)."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.1, interval_step=0.2,
                                   interval_max=0.5, timeout=timeout)

    # -- models --------------------------------------------------------------------------
    def model(self, ref: str) -> tuple[ModelVersion, ModelRef]:
        """``name[:variant][@version]`` -> (the version it means now, the parsed reference).

        The reference, not the version resolved here, travels with the job: the worker
        resolves it again, so a new default reaches running workers without a restart.
        """
        parsed = parse_model_ref(ref)
        now = time.monotonic()
        cached = self._models.get(ref)
        if cached is None or now - cached[0] > MODEL_TTL:
            cached = (now, self.repo.resolve(parsed))
            self._models[ref] = cached
        return cached[1], parsed

    # -- publishing ----------------------------------------------------------------------
    def publish(self, ref: ModelRef, job_id: str, inputs: dict[str, Any],
                producer: Any = None, retry_policy: dict[str, Any] | None = None,
                priority: str = "normal", deadline: float | None = None,
                trace: dict[str, str] | None = None, **extra: Any) -> None:
        """Send one ``inferq.infer`` message. ``trace``: the job's trace context (its
        submit span, ``shared/tracing.py``; ``{}``: none); unset, the current span's."""
        kwargs = {"model": ref.name, "variant": ref.variant, "version": ref.version,
                  "inputs": wire_inputs(inputs), "submitted_at": time.time(), **extra}
        if deadline is not None:
            kwargs["deadline"] = deadline
        self.app.send_task(INFER_TASK, kwargs=kwargs, task_id=job_id,
                           queue=model_queue(self.settings, ref.name, priority),
                           producer=producer, retry=True,
                           retry_policy=retry_policy or PUBLISH_RETRY,
                           headers=(tracing.outgoing() if trace is None else trace) or None)

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
        from producer.bulk import BatchHandle as _Handle  # avoids an import cycle

        return _Handle.start(self, model, np.asarray(rows),
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


def deadline_after(expires_in: float | None) -> float | None:
    """``expires_in`` seconds from now as an epoch deadline; None stays None."""
    if expires_in is None:
        return None
    if not isinstance(expires_in, int | float) or not expires_in > 0:
        raise InputError(f"expires_in must be a positive number of seconds, got "
                         f"{expires_in!r}", field="expires_in")
    return time.time() + float(expires_in)


def wire_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Text travels as a list of str; the codec carries numeric arrays only."""
    return {k: v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v
            for k, v in inputs.items()}


def coerce_inputs(manifest: Manifest, row: Any) -> dict[str, np.ndarray]:
    """A row, a few rows, or {input name: value} -> {input name: array of rows}.

    Rows numpy cannot stack (ragged) are an InputError naming the first odd row.
    """
    try:
        return _coerce(manifest, row)
    except ValueError:  # numpy: "setting an array element with a sequence"
        values = row if isinstance(row, dict) else {manifest.inputs[0].name: row}
        for name, value in values.items():
            odd = _odd_row(value)
            if odd is not None:
                raise InputError(f"row {odd}, field {name!r}: its shape differs from row "
                                 "0's; every row needs the model's row shape", row=odd,
                                 field=name) from None
        raise InputError("inputs: rows of different shapes cannot be one job") from None


def _odd_row(rows: Any) -> int | None:
    """The first row whose shape differs from row 0's, or None."""
    if not isinstance(rows, list):
        return None
    first = None
    for i, row in enumerate(rows):
        try:
            shape = np.shape(row)
        except ValueError:  # ragged within the row
            return i
        if first is None:
            first = shape
        elif shape != first:
            return i
    return None


def _coerce(manifest: Manifest, row: Any) -> dict[str, np.ndarray]:
    values = row if isinstance(row, dict) else {manifest.inputs[0].name: row}
    unknown = set(values) - {s.name for s in manifest.inputs}
    if unknown:
        raise InputError(f"unknown input(s) {sorted(unknown)} for model {manifest.name}; "
                         f"it takes {[s.name for s in manifest.inputs]}")
    out = {}
    for spec in manifest.inputs:
        if spec.name not in values:
            raise InputError(f"missing input {spec.name!r} for model {manifest.name}",
                             field=spec.name)
        value = values[spec.name]
        if spec.dtype == "string":  # one text, or a few
            texts = [value] if isinstance(value, str) else list(value)
            data, _, errors = check_text_rows(spec, texts)
            if errors:
                raise InputError(errors[0].message, row=errors[0].row, field=spec.name)
            out[spec.name] = data
            continue
        arr = np.asarray(value) if not isinstance(value, list) else value
        try:
            many = as_row(spec, arr)[None]
        except InputError:
            many = np.asarray(arr)
            if many.ndim < 2:
                raise
        data, _, errors = check_rows(spec, many)
        if errors:
            raise InputError(errors[0].message, row=errors[0].row, field=spec.name)
        out[spec.name] = data
    return out


def to_result(job_id: str, meta: dict[str, Any]) -> JobResult:
    status = status_of(meta)
    value = meta.get("result")
    res = JobResult(job_id=job_id, status=status)
    if isinstance(value, BaseException) or status is JobStatus.failed:
        res.error = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) \
            else str(value)
        return res
    if isinstance(value, dict):
        res.model = value.get("model")
        res.version = value.get("version")
        res.variant = value.get("variant")
        res.submitted_at = value.get("submitted_at")
        res.started_at = value.get("started_at")
        res.worker = value.get("worker")
        if status is JobStatus.cancelled:
            res.error = "cancelled before it ran"
            res.finished_at = value.get("cancelled_at")
        elif status is JobStatus.expired:
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
    return res
