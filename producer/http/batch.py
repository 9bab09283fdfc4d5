"""The batch side of the HTTP client: ``HttpClient.submit_many`` and ``HttpClient.batch``
return an ``HttpBatch``, whose ``progress()``, ``iter_rows()`` and ``results()`` read a batch
back from the results API (``inferq api``), in input order.

Also the JSON/NDJSON encoding of rows and the decoding of outputs into numpy arrays, which
``producer.http`` shares. Every public name here is re-exported by ``producer.http``.

Imports the standard library, httpx, numpy, pydantic and ``shared`` schemas and errors
only (``HttpClient`` for type checking alone), so it works on a base install.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict

from producer.http.wire import as_array, quote
from shared.errors import JobNotFound, Unavailable
from shared.schemas import TensorSpec

if TYPE_CHECKING:
    from producer.http.client import HttpClient

__all__ = ["BatchProgress", "BatchResult", "HttpBatch", "RowResult"]

_STREAM_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


# -- what the API returns ----------------------------------------------------------------
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
    """Every row of a batch in input order: the shape of ``producer.bulk.batch.BatchResult``.

    ``outputs``: output name -> array with one entry per input row (zeros where a row
    failed); ``ok``: per-row mask; ``errors``: row -> message; ``truncated``: text rows
    cut to the model's maximum length."""

    outputs: dict[str, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]
    truncated: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ok)


# -- the batch -----------------------------------------------------------------------------
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
        self.last_progress = self.client.batch_progress(self.id)
        return self.last_progress

    def cancel(self) -> BatchProgress:
        """Cancel the rows that have not run; what already ran keeps its results."""
        self.last_progress = BatchProgress.model_validate(
            self.client.request_json("DELETE", f"/v1/batches/{quote(self.id)}"))
        return self.last_progress

    def iter_rows(self, *, offset: int = 0, follow: bool = True,
                  timeout: float | None = 60.0) -> Iterator[RowResult]:
        """Every row's result from ``offset`` on, in input order, as the batch runs.

        ``follow=False`` stops at the first unfinished part. ``timeout`` bounds the wait for
        any one result (TimeoutError); a dropped connection resumes where it stopped.
        """
        specs = self.client.output_specs(self.model)
        for line in self._lines(offset, follow, timeout):
            outputs = line.get("outputs")
            yield RowResult(
                row=int(line["row"]), ok=bool(line["ok"]),
                outputs=None if outputs is None else
                {k: as_array(v, specs.get(k), row=True) for k, v in outputs.items()},
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
        buffer = _Outputs(total, list(self.client.output_specs(self.model).values()))
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
        path = f"/v1/batches/{quote(self.id)}/results"
        while True:
            params = {"offset": str(offset), "follow": "true" if follow else "false"}
            limit = httpx.Timeout(self.client.timeout, read=timeout)
            got = 0
            try:
                with self.client.http.stream("GET", path, params=params,
                                             timeout=limit) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = self.client.error_for_response(response, path, JobNotFound)
                        if response.status_code not in (429, 503):
                            raise error
                        drops += 1
                        waited += self.client.pause_before_retry(error, drops, waited)
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
                arr[row] = as_array(value, self.specs.get(name), row=True)
                continue
            try:
                arr[row] = value
            except ValueError:  # a ragged output: keep each row's array as it is
                arr = self.out[name] = _objects(arr)
                arr[row] = as_array(value, self.specs.get(name), row=True)

    def _allocate(self, name: str, value: Any) -> np.ndarray:
        spec = self.specs.get(name)
        first = as_array(value, spec, row=True)
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
