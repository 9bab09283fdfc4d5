"""The HTTP client: the SDK's verbs (``submit``, ``get``, ``wait``, ``cancel``,
``submit_many``) over the results API (``inferq api``) instead of the broker.

A web backend can switch between ``producer.client.Client`` (direct broker access) and
``HttpClient`` without changing the code that uses them::

    client = HttpClient("https://inferq.example.com", api_key)   # or Client()
    job = client.submit("digits", row)
    outputs = job.result(timeout=10)          # {output name: numpy array, one per row}
    batch = client.submit_many("digits", rows)
    res = batch.results()                     # outputs, ok, errors, truncated; input order

Imports the standard library, httpx, numpy, pydantic and ``shared`` schemas and errors
only: no Celery, Redis, pyarrow or model runtimes, so it works on a base install.

Errors are the SDK's (``shared.errors``): 422 ``InputError`` (with ``row`` and ``field``),
404 ``JobNotFound``/``ModelNotFound``, 401 ``AuthError``, 429 ``Busy`` and 503
``Unavailable`` (both with ``retry_after``). 429 and 503 are retried a few times first,
waiting as long as the server's ``Retry-After`` says, within a bounded total wait.

The batch side (``HttpBatch``, ``BatchProgress``, ``RowResult``, ``BatchResult``) lives in
``producer.http.batch``; ``producer.http`` exports both.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from producer.http.batch import BatchProgress, HttpBatch
from producer.http.wire import (
    NDJSON,
    ApiError,
    as_array,
    dumps,
    error_for,
    jsonable,
    ndjson,
    quote,
)
from shared import backoff
from shared.errors import (
    InferqError,
    InvalidModelName,
    JobNotFound,
    ModelNotFound,
    Unavailable,
)
from shared.schemas import FINAL_STATUSES, JobResult, JobStatus, RowError, TensorSpec

__all__ = ["HttpClient", "HttpJob", "ModelInfo"]

MODEL_TTL = 60.0  # seconds an unpinned model's manifest is reused (a pinned one: always)
_FINAL = FINAL_STATUSES


# -- what the API returns ----------------------------------------------------------------
class ModelInfo(BaseModel):
    """``GET /v1/models/{name}``: the version a reference serves now, what it takes and
    returns."""

    model_config = ConfigDict(extra="ignore")

    name: str
    version: int
    variant: str
    task: str = ""
    runtime: str = ""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quality: dict[str, float] = Field(default_factory=dict)
    variants: list[str] = Field(default_factory=list)

    @property
    def ref(self) -> str:
        """The exact reference (``name:variant@version``) of this manifest."""
        return f"{self.name}:{self.variant}@{self.version}"


# -- the client ----------------------------------------------------------------------------
class HttpClient:
    """One per process (thread-safe); the same verbs as ``producer.client.Client``.

    ``retries``: how many times a 429 or 503 answer (and a failed connection) is retried,
    waiting ``Retry-After`` seconds (or a short backoff) each time, at most
    ``max_retry_wait`` seconds in all; 0 turns retrying off. ``transport``: an httpx
    transport, e.g. ``httpx.MockTransport`` in tests.
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, *, retries: int = 3,
                 max_retry_wait: float = 30.0, headers: Mapping[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                     "User-Agent": "inferq-http-client", **dict(headers or {})})
        self._models: dict[str, tuple[float, ModelInfo]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models --------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        """Every model in the repository, at the version it serves now."""
        infos = [ModelInfo.model_validate(m) for m in self.request_json("GET", "/v1/models",
                                                                 not_found=ModelNotFound)]
        now = time.monotonic()
        with self._lock:
            for info in infos:
                self._models[info.name] = (now, info)
        return infos

    def model(self, ref: str) -> ModelInfo:
        """``name[:variant][@version]`` -> its manifest; cached (a pinned one for good)."""
        now = time.monotonic()
        cached = self._models.get(ref)
        if cached is not None and ("@" in ref or now - cached[0] <= MODEL_TTL):
            return cached[1]
        info = ModelInfo.model_validate(
            self.request_json("GET", f"/v1/models/{quote(ref)}", not_found=ModelNotFound))
        with self._lock:
            self._models[ref] = (now, info)
            self._models.setdefault(info.ref, (now, info))
        return info

    def output_specs(self, *refs: str) -> dict[str, TensorSpec]:
        """Output specs by name from the first of ``refs`` the API knows, or {} when no
        manifest can be had (results then keep the dtypes numpy infers from JSON)."""
        for ref in refs:
            try:
                return {s.name: s for s in self.model(ref).outputs}
            except (ModelNotFound, InvalidModelName, ApiError):
                continue
        return {}

    # -- jobs ----------------------------------------------------------------------------
    def submit(self, model: str, row: Any, *, callback_url: str | None = None,
               wait: float | str | None = None) -> HttpJob:
        """Enqueue one row (or a few, as a 2-D array, or {input name: value}).

        ``wait``: long-poll up to this many seconds (or "2s", "500ms") for the result; a job
        that finishes in time comes back with it, so ``result()`` needs no second request.
        ``callback_url``: the API POSTs the final result there, signed.
        """
        body: dict[str, Any] = {"inputs": jsonable(row)}
        if callback_url is not None:
            body["callback_url"] = callback_url
        params, extra = _wait_param(wait)
        response = self._request(
            "POST", f"/v1/models/{quote(model)}/jobs", not_found=ModelNotFound,
            content=dumps(body), headers={"Content-Type": "application/json"},
            params=params, timeout=self.timeout + extra,
            # 503 while long-polling may come after the job was enqueued: not resent
            retry_503=not params)
        data = response.json()
        job = HttpJob(self, data["id"], data.get("model") or model)
        if response.status_code == 200:  # a JobView: it finished within ?wait
            res = self._to_result(data)
            if res.done:
                job._final = res
        return job

    def get(self, job_id: str) -> JobResult:
        """The job's status and, when done, its outputs (numpy, the manifest's dtypes)."""
        return self._to_result(self.request_json("GET", f"/v1/jobs/{quote(job_id)}"))

    def wait(self, job_id: str, timeout: float | None = 30.0) -> JobResult:
        """Long-poll until the job is final; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 30.0 if deadline is None else deadline - time.monotonic()
            params, extra = _wait_param(max(0.0, min(left, 30.0)))
            data = self.request_json("GET", f"/v1/jobs/{quote(job_id)}", params=params,
                              timeout=self.timeout + extra)
            res = self._to_result(data)
            if res.done:
                return res
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s "
                                   f"(status {res.status.value})")

    def cancel(self, job_id: str) -> bool:
        """Cancel a job no worker has started; False when it already ran (or is running).

        True also for a job that was cancelled before. JobNotFound for an unknown id."""
        response = self._request("DELETE", f"/v1/jobs/{quote(job_id)}", allow=(409,))
        if response.status_code == 409:
            return self.get(job_id).status is JobStatus.cancelled
        return bool(response.json().get("status") == JobStatus.cancelled.value)

    def job(self, job_id: str, model: str = "") -> HttpJob:
        """A handle on a job submitted elsewhere (another process, an earlier request)."""
        return HttpJob(self, job_id, model)

    # -- batches -------------------------------------------------------------------------
    def submit_many(self, model: str, rows: Any, *, callback_url: str | None = None
                    ) -> HttpBatch:
        """Enqueue many rows as one batch; results come back in input order.

        ``rows``: a numpy array (one row per entry of axis 0), a sequence of rows, or any
        iterable of rows (numpy arrays, lists, text, or {input name: value}). They are sent
        as NDJSON, encoded while the body streams, so memory stays flat. Rows that do not
        fit the model become errors that name the row; the rest run. A sequence or an
        array is resent on a retried 429/503; a one-shot iterator is sent once.
        """
        params = {"model": model}
        if callback_url is not None:
            params["callback_url"] = callback_url
        reusable = isinstance(rows, np.ndarray) or (hasattr(rows, "__len__")
                                                   and hasattr(rows, "__getitem__"))
        sent = [False]

        def body() -> Iterator[bytes]:
            if sent[0] and not reusable:
                raise _NoRetry()
            sent[0] = True
            return ndjson(rows)

        response = self._request("POST", "/v1/batches", not_found=ModelNotFound,
                                 content=body, params=params,
                                 headers={"Content-Type": NDJSON})
        progress = BatchProgress.model_validate(response.json())
        return HttpBatch(self, progress.id, model, progress)

    def batch(self, batch_id: str, model: str | None = None) -> HttpBatch:
        """A handle on a batch submitted elsewhere; ``model`` (the reference it was
        submitted with) picks the manifest results are converted with."""
        progress = self.batch_progress(batch_id)
        return HttpBatch(self, batch_id, model or progress.model, progress)

    def batch_progress(self, batch_id: str) -> BatchProgress:
        return BatchProgress.model_validate(
            self.request_json("GET", f"/v1/batches/{quote(batch_id)}"))

    # -- conversions ---------------------------------------------------------------------
    def _to_result(self, view: dict[str, Any]) -> JobResult:
        timings = view.get("timings") or {}
        res = JobResult(job_id=view["id"], status=JobStatus(view["status"]),
                        model=view.get("model") or None, version=view.get("version"),
                        variant=view.get("variant"),
                        errors=[RowError.model_validate(e) for e in view.get("errors", [])],
                        error=view.get("error"), truncated=list(view.get("truncated", [])),
                        batch_rows=list(timings.get("batch_rows", [])),
                        submitted_at=timings.get("submitted_at"),
                        started_at=timings.get("started_at"),
                        finished_at=timings.get("finished_at"), worker=view.get("worker"))
        outputs = view.get("outputs")
        if outputs is not None:
            specs = self.output_specs(_exact_ref(view), res.model) if res.model else {}
            res.outputs = {k: as_array(v, specs.get(k)) for k, v in outputs.items()}
        return res

    # -- requests ------------------------------------------------------------------------
    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _request(self, method: str, path: str, *,
                 not_found: type[InferqError] = JobNotFound, allow: tuple[int, ...] = (),
                 content: bytes | Callable[[], Iterator[bytes]] | None = None,
                 retry_503: bool = True, **kwargs: Any) -> httpx.Response:
        """One request with bounded retries; an error answer raises the SDK's error."""
        waited = 0.0
        attempt = 0
        last: InferqError | None = None
        while True:
            attempt += 1
            try:
                body = content() if callable(content) else content
            except _NoRetry:
                assert last is not None
                raise last from None
            try:
                response = self.http.request(method, path, content=body, **kwargs)
            except httpx.ConnectError as exc:  # nothing reached the server: safe to resend
                last = Unavailable(f"cannot connect to {self.base_url}: {exc}; is the API "
                                   "running?")
            except httpx.TimeoutException as exc:
                raise TimeoutError(f"{method} {self.base_url}{path}: no answer in time "
                                   f"({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise Unavailable(f"{method} {self.base_url}{path}: the connection failed "
                                  f"({type(exc).__name__}: {exc})") from None
            else:
                code = response.status_code
                if code < 400 or code in allow:
                    return response
                last = error_for(response, path, not_found)
                if not (code == 429 or (code == 503 and retry_503)):
                    raise last
            waited += self.pause_before_retry(last, attempt, waited)

    def pause_before_retry(self, error: InferqError, attempt: int, waited: float) -> float:
        """Sleep before retry ``attempt + 1`` (Retry-After, else a short backoff) and
        return how long; raise ``error`` when the retries or the wait budget are spent."""
        after = getattr(error, "retry_after", None)
        delay = after if after is not None else backoff.exponential(attempt - 1, 0.25, 5.0)
        if attempt > self.retries or waited + delay > self.max_retry_wait:
            raise error
        time.sleep(delay)  # the server asked for this pause (Retry-After)
        return float(delay)

    def error_for_response(self, response: httpx.Response, path: str,
                   not_found: type[InferqError] = JobNotFound) -> InferqError:
        """An error answer -> the SDK's exception (for ``HttpBatch``'s results stream)."""
        return error_for(response, path, not_found)


class _NoRetry(Exception):
    """A one-shot streamed body cannot be sent again."""


@dataclass
class HttpJob:
    client: HttpClient
    id: str
    model: str
    _final: JobResult | None = field(default=None, repr=False)

    def status(self) -> JobStatus:
        if self._final is not None:
            return self._final.status
        return self.client.get(self.id).status

    def get(self) -> JobResult:
        return self._final if self._final is not None else self.client.get(self.id)

    def result(self, timeout: float | None = 30.0) -> dict[str, np.ndarray]:
        """The outputs; raises JobFailed if the job or its row failed, JobCancelled (a
        JobFailed) if it was cancelled, TimeoutError if not finished in time."""
        res = self._final if self._final is not None else self.client.wait(self.id, timeout)
        self._final = res
        return res.checked_outputs()

    def cancel(self) -> bool:
        return self.client.cancel(self.id)


# -- helpers -------------------------------------------------------------------------------
def _exact_ref(view: Mapping[str, Any]) -> str:
    ref = str(view["model"])
    if view.get("variant"):
        ref += f":{view['variant']}"
    if view.get("version"):
        ref += f"@{view['version']}"
    return ref


def _wait_param(wait: float | str | None) -> tuple[dict[str, str], float]:
    """``?wait=`` (whole milliseconds) and the seconds the request may take longer."""
    if wait is None:
        return {}, 0.0
    if isinstance(wait, str):
        text = wait.strip()
        seconds = float(text[:-2]) / 1000 if text.endswith("ms") else \
            float(text.rstrip("s"))
    else:
        seconds = float(wait)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"wait: {wait!r} is not a number of seconds >= 0")
    ms = int(seconds * 1000)
    return ({"wait": f"{ms}ms"}, seconds) if ms > 0 else ({}, 0.0)


