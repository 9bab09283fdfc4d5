"""Job bodies besides JSON, for clients that hold arrays.

In, on ``POST /v1/models/{m}/jobs``:

- ``application/msgpack``: the JSON body's fields as a msgpack map (numbers stay binary
  floats: no decimal text to print and parse);
- ``application/x-npy``: one ``.npy`` array, the rows of the model's (single) input; the
  other fields as query parameters (``priority``, ``expires_in``, ``callback_url``).

Out, on that route and ``GET /v1/jobs/{id}``: ``Accept: application/msgpack`` gets the
same document as msgpack. Anything malformed is one 422 line naming the part.
"""

from __future__ import annotations

import io
from typing import Any, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from api.schemas import JobRequest
from shared.errors import InputError

JSON = "application/json"
MSGPACK = "application/msgpack"
NPY = "application/x-npy"
BODY_TYPES = (JSON, MSGPACK, NPY)
NPY_OPTIONS = ("priority", "expires_in", "callback_url")  # query parameters with .npy
Model = TypeVar("Model", bound=BaseModel)


def media_type(value: str | bytes | None) -> str:
    """``Content-Type: application/msgpack; charset=...`` -> ``application/msgpack``."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return (value or "").split(";")[0].strip().lower()


def wants_msgpack(accept: str | bytes | None) -> bool:
    """Does ``Accept`` name msgpack before (or without) JSON?"""
    types = [media_type(part) for part in (accept.decode("latin-1") if isinstance(
        accept, bytes) else accept or "").split(",")]
    for kind in types:
        if kind == MSGPACK:
            return True
        if kind in (JSON, "application/*", "*/*"):
            return False
    return False


def encode(answer: BaseModel, msgpack_wanted: bool) -> tuple[bytes, str]:
    """The response body and its media type."""
    if msgpack_wanted:
        return msgpack.packb(answer.model_dump(mode="json")), MSGPACK
    return answer.model_dump_json().encode(), JSON


def decode_job(kind: str, body: bytes, options: dict[str, str]) -> JobRequest:
    """A msgpack or .npy job body (``options``: the query's fields) -> the request."""
    if kind == MSGPACK:
        fields = _unpack(body)
        if options:
            raise InputError(f"query parameter {next(iter(options))!r}: with a msgpack body, "
                             "send it in the body", field=next(iter(options)))
    else:
        unknown = sorted(set(options) - set(NPY_OPTIONS))
        if unknown:
            raise InputError(f"query parameter {unknown[0]!r} is not known; with a .npy body "
                             f"the query takes {', '.join(('wait', *NPY_OPTIONS))}",
                             field=unknown[0])
        fields = {"inputs": _npy(body), **options}
    return validated(JobRequest, fields)


def validated(model: type[Model], fields: Any) -> Model:
    """``fields`` as ``model``, or one InputError naming the first bad field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InputError(f"{where}: {first['msg']}", field=where) from None


def _unpack(body: bytes) -> dict[str, Any]:
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - truncated, too deep, trailing bytes, ...
        why = str(exc) or ("nested too deeply" if isinstance(exc, msgpack.StackError)
                           else "")
        raise InputError(f"body: not a readable msgpack document ({type(exc).__name__}: "
                         f"{why})", field="body") from None
    if not isinstance(fields, dict):
        raise InputError(f"body: expected a msgpack map with 'inputs', got "
                         f"{type(fields).__name__}", field="body")
    return fields


def _npy(body: bytes) -> Any:
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a hostile header reaches numpy's parser
        raise InputError(f"body: not a readable .npy array ({type(exc).__name__}: {exc})",
                         field="body") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biufU":
        raise InputError(f"body: expected an array of numbers or text, got dtype "
                         f"{getattr(arr, 'dtype', type(arr).__name__)}", field="body")
    return arr.tolist() if arr.dtype.kind == "U" else arr
