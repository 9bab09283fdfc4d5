"""What the HTTP client sends and reads: rows as JSON or NDJSON, outputs as numpy arrays,
and the API's error answers as the SDK's exceptions. Standard library, httpx, numpy and
``shared`` only, so it works on a base install."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np

from shared.errors import (
    AuthError,
    Busy,
    InferqError,
    InputError,
    InvalidModelName,
    ModelNotFound,
    Unavailable,
)
from shared.schemas import TensorSpec

NDJSON = "application/x-ndjson"


BLOCK_ROWS = 1024  # rows encoded per piece of a streamed NDJSON body


class ApiError(InferqError):
    """An HTTP answer with no more specific SDK error (400, 409, 413 aside, 500, ...)."""

    def __init__(self, message: str, *, status_code: int, detail: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe=":@")


def as_array(value: Any, spec: TensorSpec | None, *, row: bool = False) -> np.ndarray:
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


def default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot send a {type(value).__name__} as JSON; send numbers, text, "
                    "lists or numpy arrays")


def jsonable(row: Any) -> Any:
    if isinstance(row, np.ndarray):
        return row.tolist()
    if isinstance(row, Mapping):
        return {str(k): jsonable(v) for k, v in row.items()}
    return row


def ndjson(rows: Any) -> Iterator[bytes]:
    """Rows -> NDJSON, ``BLOCK_ROWS`` lines per piece (numpy blocks via ``tolist``)."""
    if isinstance(rows, np.ndarray):
        if rows.ndim == 0:
            raise InputError("rows: expected one row per entry of axis 0, got a scalar")
        for start in range(0, len(rows), BLOCK_ROWS):
            block = rows[start:start + BLOCK_ROWS].tolist()
            yield ("\n".join(json.dumps(r, default=default, separators=(",", ":"))
                             for r in block) + "\n").encode()
        return
    if isinstance(rows, str | bytes | Mapping):
        raise InputError("rows: expected many rows (an array, list or iterable of rows), "
                         f"got a single {type(rows).__name__}")
    lines: list[str] = []
    for row in rows:
        lines.append(json.dumps(jsonable(row), default=default, separators=(",", ":")))
        if len(lines) >= BLOCK_ROWS:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


def dumps(value: Any) -> bytes:
    return json.dumps(value, default=default, separators=(",", ":")).encode()


def retry_after(value: str | None) -> float | None:
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


def error_for(response: httpx.Response, path: str, not_found: type[InferqError]
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
    after = retry_after(response.headers.get("retry-after"))
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
