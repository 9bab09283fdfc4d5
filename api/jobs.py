"""``/v1/models/{model}/jobs`` and ``/v1/jobs/{id}``: enqueue, poll (or long-poll), cancel."""

from __future__ import annotations

import re
import time
import uuid
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.auth import Principal
from api.bodies import encode, wants_msgpack
from api.context import Api, Who, api_of, audit, not_found
from api.schemas import (
    Accepted,
    CallbackInfo,
    JobRequest,
    JobView,
    Problem,
    Timings,
)
from api.store import Admission, flat_record
from api.submitter import LoopSubmitter, Pending, Verdict
from producer.bulk.chunks import check_fits
from producer.notify import RECHECK_S, Reply
from producer.publish import coerce_inputs, deadline_after, wire_inputs
from shared import claims, tracing
from shared.errors import InputError
from shared.repository import ModelRef, parse_model_ref
from shared.results import every_row_failed, is_final, status_of
from shared.schemas import FINAL_STATUSES, JobStatus, RowError

router = APIRouter(prefix="/v1", tags=["jobs"])

_WAIT = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)?$")
WaitParam = Annotated[str | None, Query(description="long-poll up to this long for the "
                                        "result, e.g. 2s or 500ms", examples=["2s"])]


def parse_wait(value: str | None, cap: float) -> float:
    if value is None:
        return 0.0
    found = _WAIT.match(value.strip())
    if not found:
        raise InputError(f"wait: {value!r} is not a duration such as 2s or 500ms",
                         field="wait")
    seconds = float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)
    return min(seconds, cap)


def _json(arr: Any) -> list[Any]:
    return arr.tolist() if isinstance(arr, np.ndarray) else list(arr)


def job_view(api: Api, job_id: str, who: Principal, *,
             count: bool = True) -> JobView:
    record = api.store.job_record(job_id)
    if record.get("tenant") != who.tenant:
        raise not_found("job", job_id)
    meta, claim = api.store.meta_with_claim(job_id)
    if meta is None:
        raise not_found("job", job_id)
    view = build_view(job_id, record, meta, claim)
    if count and is_final(meta) and api.store.first_final(job_id):
        _count(api, view)
    return view


def _count(api: Api, view: JobView) -> None:
    t = view.timings
    api.metrics.finished(view.model, view.status.value,
                         None if t.finished_at is None or t.submitted_at is None
                         else t.finished_at - t.submitted_at)


def build_view(job_id: str, record: dict[str, str], meta: dict[str, Any],
               claim: bytes | None) -> JobView:
    status = status_of(meta)
    if status is JobStatus.queued and claim == claims.RUN:
        status = JobStatus.running
    value = meta.get("result")
    info = value if isinstance(value, dict) else {}
    timings = Timings(submitted_at=info.get("submitted_at") or _float(record, "submitted_at"),
                      started_at=info.get("started_at"),
                      finished_at=(info.get("finished_at") or info.get("cancelled_at")
                                   or info.get("expired_at")),
                      batch_rows=list(info.get("batch_rows", [])))
    if timings.started_at and timings.submitted_at:
        timings.queue_wait_s = round(timings.started_at - timings.submitted_at, 6)
    if timings.started_at and timings.finished_at:
        timings.run_s = round(timings.finished_at - timings.started_at, 6)
    view = JobView(id=job_id, status=status, model=record.get("model", ""),
                   version=info.get("version"), variant=info.get("variant"),
                   timings=timings, worker=info.get("worker"),
                   callback=CallbackInfo.from_record(record))
    if status is JobStatus.cancelled:
        view.error = "cancelled before it ran"
    elif status is JobStatus.expired:
        view.error = "expired: its deadline passed before a worker started it; not run"
    elif status is JobStatus.failed:
        view.error = (f"{type(value).__name__}: {value}" if isinstance(value, BaseException)
                      else str(value))
    elif status is JobStatus.succeeded and info:
        view.outputs = {k: _json(v) for k, v in info.get("outputs", {}).items()}
        view.errors = [RowError(row=e["row"], field=e.get("field"), message=e["message"])
                       for e in info.get("errors", [])]
        view.truncated = list(info.get("truncated", []))
        if (every_failed := every_row_failed(info)) is not None:
            view.status, view.error = JobStatus.failed, every_failed
    return view


def _float(record: dict[str, str], key: str) -> float | None:
    return float(record[key]) if key in record else None


def _checked(api: Api, who: Principal, model: str, body: JobRequest, *,
             observed: bool) -> tuple[ModelRef, dict[str, Any], dict[str, Any]]:
    """A job request checked against its model and limits; -> (the model reference, the
    inputs as they travel, the job's record)."""
    version, ref = api.model(model)
    inputs = coerce_inputs(version.manifest, body.inputs)
    check_fits(api.settings, inputs)
    rows = len(next(iter(inputs.values())))
    if rows > api.settings.api_max_job_rows:
        raise HTTPException(413, f"inputs: {rows} rows in one job; the limit is "
                            f"{api.settings.api_max_job_rows} (INFERQ_API_MAX_JOB_ROWS); "
                            "use POST /v1/batches for many rows")
    callback_url = api.check_callback(who, body.callback_url)
    record = {"tenant": who.tenant, "key_id": who.key_id, "model": ref.name, "ref": model,
              "rows": rows, "submitted_at": time.time(), "callback_url": callback_url,
              "observed": 1 if observed else None}
    return ref, wire_inputs(inputs), record


def _enqueue(api: Api, who: Principal, model: str, body: JobRequest, job_id: str, *,
             observed: bool = False, trace: dict[str, str] | None = None) -> dict[str, str]:
    """Admit, record and send one job by the coalescer (a thread's call); -> its record.
    ``observed``: the caller will count the job's end in the metrics itself (it waits for
    the reply); ``trace``: the request's trace context (``shared/tracing.py``)."""
    ref, inputs, record = _checked(api, who, model, body, observed=observed)
    with tracing.submitting(ref.name, job_id, trace):
        flat = api.create_job(who, job_id, record, record["callback_url"] is not None)
        try:
            api.coalescer.publish(ref, job_id, inputs, body.priority,
                                  deadline_after(body.expires_in))
        except Exception:
            api.store.drop_job(job_id)
            api.store.forget_open(ref.name, who.tenant, [job_id])
            raise
    audit("submit", who, job_id=job_id, model=model, rows=record["rows"])
    return flat


async def _submit_on_loop(api: Api, submitter: LoopSubmitter, who: Principal, model: str,
                          body: JobRequest, job_id: str, *, observed: bool = False,
                          trace: dict[str, str] | None = None) -> dict[str, str]:
    """``_enqueue`` by the event loop's submitter (``api/submitter.py``). What may block
    runs in the thread pool first: a model not resolved within the last seconds (its
    repository may be a bucket or the catalog), a callback URL (its name is resolved), a
    job of many rows (converting them takes a while)."""
    if not api.client.models.fresh(parse_model_ref(model)) or _heavy(body):
        ref, inputs, record = await run_in_threadpool(
            partial(_checked, api, who, model, body, observed=observed))
    else:
        ref, inputs, record = _checked(api, who, model, body, observed=observed)
    quota = api.quota(who, ref.name)

    def sent(verdict: Verdict) -> None:  # also when the request went away meanwhile
        if verdict[0]:
            api.depth.added(ref.name, 1)
            audit("submit", who, job_id=job_id, model=model, rows=record["rows"])

    with tracing.submitting(ref.name, job_id, trace):
        job = Pending(job_id, ref, body.priority, inputs, record,
                      record["callback_url"] is not None, quota,
                      deadline_after(body.expires_in), tracing.outgoing(),
                      record["submitted_at"])
        ok, held, depth = await submitter.submit(job, sent)
        if not ok and quota is not None:
            raise api.refusal(Admission(ref.name, quota.tenant, quota.share, depth,
                                        quota.limit), 1, held)
    return flat_record(record)


HEAVY_ITEMS = 16_384  # values in a job's inputs above which it is checked off the loop


def _heavy(body: JobRequest) -> bool:
    """Checking it may block (a callback URL's name is resolved) or take a while."""
    if body.callback_url is not None:
        return True
    values = body.inputs.values() if isinstance(body.inputs, dict) else [body.inputs]
    return sum(_items(v) for v in values) > HEAVY_ITEMS


def _items(value: Any) -> int:
    """About how many values ``value`` holds: arrays exactly, nested lists by their
    first element."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, list):
        return len(value) * (_items(value[0]) if value else 1)
    return 1


async def _wait_reply(api: Api, job_id: str, record: dict[str, str], who: Principal,
                      reply: Reply, seconds: float) -> JobView | None:
    """A job this process just sent with its reply channel: its result arrives with the
    wake-up (no read); re-read every RECHECK_S without one. None: not final in time."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        value = await reply.next(max(0.0, min(left, RECHECK_S)))
        meta = None if value is None else api.store.backend.decode_result(value)
        if meta is not None and is_final(meta):
            view = build_view(job_id, record, meta, None)
            break
        if deadline - time.monotonic() <= 0:
            await run_in_threadpool(api.store.unobserve, job_id)
            return None  # whoever reads it final counts it
        view = await run_in_threadpool(lambda: job_view(api, job_id, who, count=False))
        if view.status in _FINAL:
            break
    _count(api, view)
    return view


async def wait_final(api: Api, job_id: str, who: Principal, seconds: float, *,
                      fresh: bool = False) -> JobView:
    """Long poll: re-read the job whenever its result is published, until it is final or
    ``seconds`` pass (``producer/notify.py``; a re-read every 0.5 s is the safety net).
    ``fresh``: the job was just enqueued, so it is not read before subscribing."""
    if not fresh:
        view = await run_in_threadpool(job_view, api, job_id, who)
        if view.status in _FINAL or seconds <= 0:
            return view
    deadline = time.monotonic() + seconds
    async with api.notifier.watching(api.store.meta_key(job_id)) as watch:
        while True:
            view = await run_in_threadpool(job_view, api, job_id, who)
            left = deadline - time.monotonic()
            if view.status in _FINAL or left <= 0:
                return view
            await watch.next(min(left, RECHECK_S))


_FINAL = FINAL_STATUSES

# Documented beside the JSON body; decoded by the fast lane (bodies.py, fastlane.py).
BINARY_BODIES = {"requestBody": {"content": {
    "application/msgpack": {"schema": {"type": "string", "format": "binary"},
                            "description": "the JSON body's fields as a msgpack map"},
    "application/x-npy": {"schema": {"type": "string", "format": "binary"},
                          "description": "a .npy array of the rows; priority, expires_in "
                          "and callback_url as query parameters"}}}}


@router.post("/models/{model}/jobs", status_code=202, response_model=Accepted,
             responses={200: {"model": JobView, "description": "finished within ?wait"}},
             summary="Enqueue one input (or a few rows)", openapi_extra=BINARY_BODIES)
async def submit_job(model: str, body: JobRequest, request: Request, who: Who,
                     wait: WaitParam = None) -> Any:
    api = api_of(request)
    status, content, headers, media = await submit(
        api, who, model, body, parse_wait(wait, api.settings.api_wait_max_s),
        wants_msgpack(request.headers.get("accept")), tracing.incoming(request.headers))
    return Response(content, status, headers, media_type=media)


async def submit(api: Api, who: Principal, model: str, body: JobRequest, seconds: float,
                 msgpack_out: bool = False, trace: dict[str, str] | None = None
                 ) -> tuple[int, bytes, dict[str, str], str]:
    """Enqueue, and with ``seconds`` wait for the end; -> (status, body, headers, media
    type). Shared by the route and its fast lane (``fastlane.py``)."""
    answer = await run(api, who, model, body, seconds, trace)
    content, media = encode(answer, msgpack_out)
    return (200 if isinstance(answer, JobView) else 202, content,
            {"Location": f"/v1/jobs/{answer.id}"}, media)


async def run(api: Api, who: Principal, model: str, body: JobRequest, seconds: float,
              trace: dict[str, str] | None = None) -> JobView | Accepted:
    """Enqueue one job; -> its view if it ended within ``seconds``, else Accepted.
    ``trace``: the request's trace context, parent of the job's submit span."""
    job_id = uuid.uuid4().hex
    api.in_flight += 1
    try:
        if seconds > 0 and await api.notifier.replying():
            reply = api.notifier.expect(job_id)
            try:
                record = await _enqueue_soon(api, who, model, body, job_id, observed=True,
                                             trace=trace)
                view = await _wait_reply(api, job_id, record, who, reply, seconds)
            finally:
                api.notifier.forget(job_id)
            if view is not None:
                return view
        else:
            await _enqueue_soon(api, who, model, body, job_id, trace=trace)
            if seconds > 0:  # no reply channel (its subscription failed): subscribe per job
                view = await wait_final(api, job_id, who, seconds, fresh=True)
                if view.status in _FINAL:
                    return view
    finally:
        api.in_flight -= 1
    return Accepted(id=job_id, status=JobStatus.queued, location=f"/v1/jobs/{job_id}")


async def _enqueue_soon(api: Api, who: Principal, model: str, body: JobRequest,
                        job_id: str, **options: Any) -> dict[str, str]:
    """``_enqueue`` in the thread pool, so requests that arrive meanwhile share its
    message (the coalescer); on the event loop itself when this is the process's only job
    request: nobody waits behind it, and two thread hand-offs are saved (docs/design.md,
    "What a request costs"). Not after a failed enqueue (an outage may block for seconds)
    until one succeeds in the pool again. Where the event loop's submitter works (a Redis
    broker that is the result store), always by it."""
    if api.submitter is not None and api.client.direct is not None:
        return await _submit_on_loop(api, api.submitter, who, model, body, job_id,
                                     **options)
    if api.in_flight == 1 and api.enqueue_healthy:
        try:
            return _enqueue(api, who, model, body, job_id, **options)
        except (HTTPException, InputError):
            raise  # the request's fault, not the stores'
        except Exception:
            api.enqueue_healthy = False
            raise
    record = await run_in_threadpool(_enqueue, api, who, model, body, job_id, **options)
    api.enqueue_healthy = True
    return record


@router.get("/jobs/{job_id}", response_model=JobView, summary="A job's status and result")
async def get_job(job_id: str, request: Request, who: Who, wait: WaitParam = None) -> Any:
    api = api_of(request)
    seconds = parse_wait(wait, api.settings.api_wait_max_s)
    view = await wait_final(api, job_id, who, seconds)
    content, media = encode(view, wants_msgpack(request.headers.get("accept")))
    return Response(content, media_type=media)


def _cancel(api: Api, job_id: str, who: Principal) -> JobView:
    view = job_view(api, job_id, who)
    if view.status in _FINAL:
        raise HTTPException(409, f"job {job_id} already {view.status.value}")
    if not api.store.cancel([job_id])[0]:
        raise HTTPException(409, f"job {job_id} is running; it can no longer be cancelled")
    audit("cancel", who, job_id=job_id, model=view.model)
    return job_view(api, job_id, who)


@router.delete("/jobs/{job_id}", response_model=JobView, summary="Cancel a job not yet run",
               responses={409: {"model": Problem,
                                "description": "already running or finished"}})
def cancel_job(job_id: str, request: Request, who: Who) -> JobView:
    return _cancel(api_of(request), job_id, who)
