"""Putting jobs on the broker: the Celery app, the settings, the result store and the
models (manifests resolved from the repository or the catalog, reused ``MODEL_TTL`` s).

``Sender`` is what ``Client``, the coalescer and bulk batches publish through; inputs are
coerced and checked against the manifest here, before anything is sent.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import direct
from producer.store import ResultStore
from shared import tracing
from shared.catalog import open_for_clients
from shared.celery_app import INFER_TASK, make_app
from shared.errors import InputError, Unavailable
from shared.queues import model_queue
from shared.repository import CachedResolver, ModelRef, ModelVersion, parse_model_ref
from shared.schemas import Manifest
from shared.settings import Settings, load_settings
from shared.validation import as_row, check_rows, check_text_rows

MODEL_TTL = 5.0  # seconds a resolved manifest is reused (the worker re-reads as often)

SHOWN_IDS = 8  # job ids a message of several jobs lists for Flower

# Publishing retries while the broker is away (~25 s), then fails naming the job.
PUBLISH_RETRY = {"max_retries": 12, "interval_start": 0.1, "interval_step": 0.5,
                 "interval_max": 3.0}


class Sender:
    """The broker side of a client: thread-safe; one per process is enough."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None):
        self.settings = settings or load_settings()
        self.app = app or make_app(self.settings)
        self.repo = open_for_clients(self.settings)
        self.store = ResultStore(self.app)
        self.models = CachedResolver(self.repo, MODEL_TTL)
        self._direct = direct.DirectPublisher(self.app)

    @property
    def direct(self) -> direct.DirectPublisher | None:
        """The publisher that puts messages straight on a Redis broker's lists; None where
        messages go through ``send_task`` (another broker, a publish hook)."""
        return self._direct if direct.usable(self.app) else None

    def check_reachable(self, timeout: float = 2.0) -> None:
        """Unavailable, naming the service and its setting, when the broker or the result
        store does not answer within ``timeout``: one try, for a command's first step
        (Celery's own reconnect loop would retry for ~20 s, then raise a traceback)."""
        if self.settings.embedded:
            return
        import redis

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

    def model(self, ref: str) -> tuple[ModelVersion, ModelRef]:
        """``name[:variant][@version]`` -> (the version it means now, the parsed reference).

        The reference, not the version resolved here, travels with the job: the worker
        resolves it again, so a new default reaches running workers without a restart.
        """
        parsed = parse_model_ref(ref)
        return self.models.resolve(parsed), parsed

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
        first = next(iter(inputs.values()), ())
        rows = len(first) if np.ndim(first) else 1
        self.send_message(INFER_TASK, job_id, kwargs,
                          model_queue(self.settings, ref.name, priority),
                          retry_policy or PUBLISH_RETRY,
                          (tracing.outgoing() if trace is None else trace) or None,
                          producer, **summary(ref, rows=rows))

    def send_message(self, name: str, task_id: str, kwargs: dict[str, Any], queue: Any,
                     retry_policy: dict[str, Any], headers: dict[str, str] | None = None,
                     producer: Any = None, **options: Any) -> None:
        """One task message on ``queue`` (a kombu Queue): straight onto a Redis broker's
        list (producer/direct.py), else through Celery's ``send_task``."""
        if producer is None and self.direct is not None:
            self._direct.send(name, task_id, kwargs, queue.name, retry_policy, headers,
                              **options)
            return
        self.app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue,
                           producer=producer, retry=True, retry_policy=retry_policy,
                           headers=headers, **options)


def summary(ref: ModelRef, ids: list[str] | None = None, **counts: int) -> dict[str, str]:
    """What Flower and Celery's events show for a message's arguments: the model, counts
    and (for a message of several jobs) the first job ids. Celery would otherwise
    ``saferepr`` the inputs for every message (~0.5 ms of the producer's CPU per message,
    measured: as much as the rest of publishing) and show row data to anyone watching."""
    shown = [f"'model': {str(ref)!r}", *(f"{k!r}: {v}" for k, v in counts.items())]
    if ids:
        more = ", ..." if len(ids) > SHOWN_IDS else ""
        shown.append(f"'ids': [{', '.join(repr(i) for i in ids[:SHOWN_IDS])}{more}]")
    return {"argsrepr": "()", "kwargsrepr": "{" + ", ".join(shown) + "}"}


def not_sent(what: str, client: Sender, exc: BaseException,
             hint: str = "submit it again") -> BaseException:
    """``exc`` as the submitter should see it when it means ``what`` was not enqueued:
    an Unavailable naming what and where (kombu raises OperationalError once publishing's
    retries are spent; the result store a redis error). Any other error: ``exc`` itself."""
    if isinstance(exc, OperationalError):
        broker = maybe_sanitize_url(client.settings.broker_url or "memory://")
        where = f"the broker {broker} could not be reached after retrying"
    elif isinstance(exc, RedisConnectionError | RedisTimeoutError):
        where = "the result store could not be reached to record it as queued"
    else:
        return exc
    error = Unavailable(f"{what} was not enqueued: {where} ({type(exc).__name__}: {exc}); "
                        f"{hint}")
    error.__cause__ = exc
    return error


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
