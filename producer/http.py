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
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import (
    AuthError,
    Busy,
    InferqError,
    InputError,
    InvalidModelName,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ModelNotFound,
    Unavailable,
)
from shared.schemas import JobResult, JobStatus, RowError, TensorSpec

__all__ = ["ApiError", "BatchProgress", "BatchResult", "HttpBatch", "HttpClient", "HttpJob",
           "ModelInfo", "RowResult"]

NDJSON = "application/x-ndjson"
MODEL_TTL = 60.0  # seconds an unpinned model's manifest is reused (a pinned one: always)
BLOCK_ROWS = 1024  # rows encoded per piece of a streamed NDJSON body
_FINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
_STREAM_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


class ApiError(InferqError):
    """An HTTP answer with no more specific SDK error (400, 409, 413 aside, 500, ...)."""

    def __init__(self, message: str, *, status_code: int, detail: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


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


class BatchProgress(BaseModel):
    """``GET /v1/batches/{id}``: counts, speed and ETA of a batch."""

    model_config = ConfigDict(extra="ignore")

    id: str
    model: str
    status: str  # queued | running | completed | cancelled
    total: int
    done: int
    failed: int
    cancelled: int = 0
    rows_per_s: float | None = None
    eta_s: float | None = None
    created_at: float
    results: str = ""
    callback: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "cancelled")


@dataclass
class RowResult:
    """One line of a batch's results stream."""

    row: int
    ok: bool
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    truncated: bool = False


@dataclass
class BatchResult:
    """Every row of a batch in input order: the shape of ``producer.bulk.BatchResult``.

    ``outputs``: output name -> array with one entry per input row (zeros where a row
    failed); ``ok``: per-row mask; ``errors``: row -> message; ``truncated``: text rows
    cut to the model's maximum length."""

    outputs: dict[str, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]
    truncated: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ok)


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
        infos = [ModelInfo.model_validate(m) for m in self._json("GET", "/v1/models",
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
            self._json("GET", f"/v1/models/{_quote(ref)}", not_found=ModelNotFound))
        with self._lock:
            self._models[ref] = (now, info)
            self._models.setdefault(info.ref, (now, info))
        return info

    def _output_specs(self, *refs: str) -> dict[str, TensorSpec]:
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
        body: dict[str, Any] = {"inputs": _jsonable(row)}
        if callback_url is not None:
            body["callback_url"] = callback_url
        params, extra = _wait_param(wait)
        response = self._request(
            "POST", f"/v1/models/{_quote(model)}/jobs", not_found=ModelNotFound,
            content=_dumps(body), headers={"Content-Type": "application/json"},
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
        return self._to_result(self._json("GET", f"/v1/jobs/{_quote(job_id)}"))

    def wait(self, job_id: str, timeout: float | None = 30.0) -> JobResult:
        """Long-poll until the job is final; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 30.0 if deadline is None else deadline - time.monotonic()
            params, extra = _wait_param(max(0.0, min(left, 30.0)))
            data = self._json("GET", f"/v1/jobs/{_quote(job_id)}", params=params,
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
        response = self._request("DELETE", f"/v1/jobs/{_quote(job_id)}", allow=(409,))
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
            return _ndjson(rows)

        response = self._request("POST", "/v1/batches", not_found=ModelNotFound,
                                 content=body, params=params,
                                 headers={"Content-Type": NDJSON})
        progress = BatchProgress.model_validate(response.json())
        return HttpBatch(self, progress.id, model, progress)

    def batch(self, batch_id: str, model: str | None = None) -> HttpBatch:
        """A handle on a batch submitted elsewhere; ``model`` (the reference it was
        submitted with) picks the manifest results are converted with."""
        progress = self._batch_progress(batch_id)
        return HttpBatch(self, batch_id, model or progress.model, progress)

    def _batch_progress(self, batch_id: str) -> BatchProgress:
        return BatchProgress.model_validate(
            self._json("GET", f"/v1/batches/{_quote(batch_id)}"))

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
            specs = self._output_specs(_exact_ref(view), res.model) if res.model else {}
            res.outputs = {k: _as_array(v, specs.get(k)) for k, v in outputs.items()}
        return res

    # -- requests ------------------------------------------------------------------------
    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
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
                last = _error(response, path, not_found)
                if not (code == 429 or (code == 503 and retry_503)):
                    raise last
            waited += self._pause(last, attempt, waited)

    def _pause(self, error: InferqError, attempt: int, waited: float) -> float:
        """Sleep before retry ``attempt + 1`` (Retry-After, else a short backoff) and
        return how long; raise ``error`` when the retries or the wait budget are spent."""
        after = getattr(error, "retry_after", None)
        delay = after if after is not None else min(0.25 * 2 ** (attempt - 1), 5.0)
        if attempt > self.retries or waited + delay > self.max_retry_wait:
            raise error
        time.sleep(delay)  # the server asked for this pause (Retry-After)
        return float(delay)


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
        if res.status is JobStatus.cancelled:
            raise JobCancelled(res.error or "cancelled before it ran")
        if res.status is not JobStatus.succeeded:
            raise JobFailed(res.error or "job failed")
        if res.errors:
            raise JobFailed("; ".join(e.message for e in res.errors))
        assert res.outputs is not None
        return res.outputs

    def cancel(self) -> bool:
        return self.client.cancel(self.id)


class HttpBatch:
    """A batch on the API: ``progress()``, ``iter_rows()`` (streamed, in input order),
    ``results()`` (all rows as numpy arrays), ``cancel()``."""

    def __init__(self, client: HttpClient, batch_id: str, model: str,
                 progress: BatchProgress | None = None):
        self.client = client
        self.id = batch_id
        self.model = model
        self.last_progress = progress

    @property
    def batch_id(self) -> str:
        return self.id

    def progress(self) -> BatchProgress:
        """Counts (total, done, failed, cancelled), rows/s and ETA."""
        self.last_progress = self.client._batch_progress(self.id)
        return self.last_progress

    def cancel(self) -> BatchProgress:
        """Cancel the rows that have not run; what already ran keeps its results."""
        self.last_progress = BatchProgress.model_validate(
            self.client._json("DELETE", f"/v1/batches/{_quote(self.id)}"))
        return self.last_progress

    def iter_rows(self, *, offset: int = 0, follow: bool = True,
                  timeout: float | None = 60.0) -> Iterator[RowResult]:
        """Every row's result from ``offset`` on, in input order, as the batch runs.

        ``follow=False`` stops at the first unfinished part. ``timeout`` bounds the wait for
        any one result (TimeoutError); a dropped connection resumes where it stopped.
        """
        specs = self.client._output_specs(self.model)
        for line in self._lines(offset, follow, timeout):
            outputs = line.get("outputs")
            yield RowResult(
                row=int(line["row"]), ok=bool(line["ok"]),
                outputs=None if outputs is None else
                {k: _as_array(v, specs.get(k), row=True) for k, v in outputs.items()},
                error=line.get("error"), truncated=bool(line.get("truncated", False)))

    def results(self, timeout: float | None = 60.0,
                on_row: Callable[[RowResult], None] | None = None) -> BatchResult:
        """All rows in input order; ``timeout`` bounds the wait for any one result."""
        if on_row is not None:
            rows: Iterable[dict[str, Any]] = (
                _line_of(r) for r in self._with_callback(timeout, on_row))
        else:
            rows = self._lines(0, True, timeout)
        total = self.last_progress.total if self.last_progress else None
        if total is None:
            total = self.progress().total
        buffer = _Outputs(total, list(self.client._output_specs(self.model).values()))
        ok = np.zeros(total, dtype=bool)
        errors: dict[int, str] = {}
        truncated: list[int] = []
        for line in rows:
            row = int(line["row"])
            if line["ok"]:
                ok[row] = True
                buffer.put(row, line["outputs"])
                if line.get("truncated"):
                    truncated.append(row)
            else:
                errors[row] = str(line.get("error") or "failed")
        return BatchResult(buffer.arrays(), ok, errors, truncated)

    def _with_callback(self, timeout: float | None, on_row: Callable[[RowResult], None]
                       ) -> Iterator[RowResult]:
        for result in self.iter_rows(timeout=timeout):
            on_row(result)
            yield result

    def _lines(self, offset: int, follow: bool, timeout: float | None
               ) -> Iterator[dict[str, Any]]:
        """The NDJSON results as dicts; reconnects (a few times) from the next row."""
        drops = 0
        waited = 0.0
        path = f"/v1/batches/{_quote(self.id)}/results"
        while True:
            params = {"offset": str(offset), "follow": "true" if follow else "false"}
            limit = httpx.Timeout(self.client.timeout, read=timeout)
            got = 0
            try:
                with self.client.http.stream("GET", path, params=params,
                                             timeout=limit) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = _error(response, path, JobNotFound)
                        if response.status_code not in (429, 503):
                            raise error
                        drops += 1
                        waited += self.client._pause(error, drops, waited)
                        continue
                    for text in response.iter_lines():
                        if not text.strip():
                            continue
                        line = json.loads(text)
                        offset = int(line["row"]) + 1
                        got += 1
                        yield line
                return
            except httpx.ReadTimeout:
                raise TimeoutError(f"batch {self.id}: no result for row {offset} in "
                                   f"{timeout} s; is a worker consuming this model's "
                                   "queue?") from None
            except (*_STREAM_ERRORS, httpx.ConnectError) as exc:
                drops = 0 if got else drops + 1
                if drops > max(self.client.retries, 1):
                    raise Unavailable(f"batch {self.id}: the results stream broke at row "
                                      f"{offset} ({type(exc).__name__}: {exc})") from None


def _line_of(result: RowResult) -> dict[str, Any]:
    line: dict[str, Any] = {"row": result.row, "ok": result.ok}
    if result.ok:
        line["outputs"] = result.outputs
        line["truncated"] = result.truncated
    else:
        line["error"] = result.error
    return line


class _Outputs:
    """Per-output arrays of ``total`` rows, filled row by row (zeros where a row failed);
    shaped and typed by the manifest's output specs, else by the first value seen."""

    def __init__(self, total: int, specs: list[TensorSpec]):
        self.total = total
        self.specs = {s.name: s for s in specs}
        self.out: dict[str, np.ndarray] = {}
        for spec in specs:
            if spec.dtype != "string" and -1 not in spec.row_shape:
                self.out[spec.name] = np.zeros((total, *spec.row_shape), spec.np_dtype)

    def put(self, row: int, outputs: Mapping[str, Any]) -> None:
        for name, value in outputs.items():
            arr = self.out.get(name)
            if arr is None:
                arr = self.out[name] = self._allocate(name, value)
            if arr.dtype == object:
                arr[row] = _as_array(value, self.specs.get(name), row=True)
                continue
            try:
                arr[row] = value
            except ValueError:  # a ragged output: keep each row's array as it is
                arr = self.out[name] = _objects(arr)
                arr[row] = _as_array(value, self.specs.get(name), row=True)

    def _allocate(self, name: str, value: Any) -> np.ndarray:
        spec = self.specs.get(name)
        first = _as_array(value, spec, row=True)
        if first.dtype == object or (spec is not None and spec.dtype == "string"):
            return np.empty(self.total, dtype=object)
        return np.zeros((self.total, *first.shape), first.dtype)

    def arrays(self) -> dict[str, np.ndarray]:
        return self.out


def _objects(arr: np.ndarray) -> np.ndarray:
    out = np.empty(len(arr), dtype=object)
    for i in range(len(arr)):
        out[i] = arr[i]
    return out


# -- helpers -------------------------------------------------------------------------------
def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe=":@")


def _exact_ref(view: Mapping[str, Any]) -> str:
    ref = str(view["model"])
    if view.get("variant"):
        ref += f":{view['variant']}"
    if view.get("version"):
        ref += f"@{view['version']}"
    return ref


def _as_array(value: Any, spec: TensorSpec | None, *, row: bool = False) -> np.ndarray:
    """JSON values -> a numpy array in the spec's dtype (object for text)."""
    if spec is not None and spec.dtype == "string":
        if row:
            out = np.empty((), dtype=object)
            out[()] = value
            return out
        arr = np.empty(len(value), dtype=object)
        arr[:] = list(value)
        return arr
    if spec is not None:
        return np.asarray(value, dtype=spec.np_dtype)
    return np.asarray(value)


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


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot send a {type(value).__name__} as JSON; send numbers, text, "
                    "lists or numpy arrays")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=_default, separators=(",", ":")).encode()


def _jsonable(row: Any) -> Any:
    if isinstance(row, np.ndarray):
        return row.tolist()
    if isinstance(row, Mapping):
        return {str(k): _jsonable(v) for k, v in row.items()}
    return row


def _ndjson(rows: Any) -> Iterator[bytes]:
    """Rows -> NDJSON, ``BLOCK_ROWS`` lines per piece (numpy blocks via ``tolist``)."""
    if isinstance(rows, np.ndarray):
        if rows.ndim == 0:
            raise InputError("rows: expected one row per entry of axis 0, got a scalar")
        for start in range(0, len(rows), BLOCK_ROWS):
            block = rows[start:start + BLOCK_ROWS].tolist()
            yield ("\n".join(json.dumps(r, default=_default, separators=(",", ":"))
                             for r in block) + "\n").encode()
        return
    if isinstance(rows, str | bytes | Mapping):
        raise InputError("rows: expected many rows (an array, list or iterable of rows), "
                         f"got a single {type(rows).__name__}")
    lines: list[str] = []
    for row in rows:
        lines.append(json.dumps(_jsonable(row), default=_default, separators=(",", ":")))
        if len(lines) >= BLOCK_ROWS:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


def _retry_after(value: str | None) -> float | None:
    """``Retry-After``: seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error(response: httpx.Response, path: str, not_found: type[InferqError]
           ) -> InferqError:
    """An error answer -> the SDK's exception (the server's detail as its message)."""
    code = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text[:500] or response.reason_phrase}
    detail = str(body.get("detail") or response.reason_phrase)
    row, field_name = body.get("row"), body.get("field")
    after = _retry_after(response.headers.get("retry-after"))
    if code == 401:
        return AuthError(f"{detail} (HTTP 401 from {response.request.url.host})")
    if code == 404:
        if detail == "Not Found" and field_name is None:  # no such route: a wrong base URL?
            return ApiError(f"404 Not Found for {response.request.url}; is the base URL the "
                            "API's root?", status_code=code, detail=detail)
        if field_name == "model" or not_found is ModelNotFound:
            return ModelNotFound(detail)
        return not_found(detail)
    if code == 422:
        if field_name == "model" and row is None:
            return InvalidModelName(detail)
        return InputError(detail, row=row, field=field_name)
    if code == 413:
        return InputError(detail, field=field_name)
    if code == 429:
        return Busy(detail, retry_after=after)
    if code == 503:
        return Unavailable(detail, retry_after=after)
    return ApiError(f"HTTP {code} from {response.request.method} {path}: {detail}",
                    status_code=code, detail=detail)
