"""The msgpack tensor codec: numeric numpy arrays travel as raw bytes, never pickle.

An array is a msgpack extension (code 42) holding ``[dtype, shape]`` and the raw
little-endian bytes; a float array of whole numbers may travel narrowed, as
``[dtype, shape, "u1" | "i2"]`` and bytes of that type, and is decoded back to ``dtype``.
Decoding checks the dtype against a numeric allow-list, the shape
against the byte count, and the whole payload against a size cap, so a hostile message
can neither run code nor make a worker allocate without bound.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import uuid
from typing import Any

import msgpack
import numpy as np

from shared.errors import CodecError

CONTENT_TYPE = "application/x-inferq-msgpack"
SERIALIZER = "inferq-msgpack"
ACCEPT = ["json", CONTENT_TYPE]  # never pickle

_ND_EXT = 42
_MAX_NDIM = 8
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str.lstrip("<>|=")
    for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    )
)
DEFAULT_MAX_BYTES = 64 * 2**20
_limits = {"max_bytes": DEFAULT_MAX_BYTES}


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, decimal.Decimal)):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in an inferq message")


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    kind = arr.dtype.str.lstrip("<>|=")
    if kind not in ALLOWED_DTYPES:
        raise CodecError(f"dtype {arr.dtype} is not allowed; use a numeric dtype")
    shape = list(arr.shape)  # before ascontiguousarray, which makes 0-d arrays 1-d
    narrow = _narrow(arr)
    if narrow is not None:  # the same values in fewer bytes; decoded back to ``kind``
        header = msgpack.packb([kind, shape, narrow.dtype.str.lstrip("<>|=")])
        return msgpack.ExtType(_ND_EXT, header + narrow.tobytes())
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    header = msgpack.packb([kind, shape])
    return msgpack.ExtType(_ND_EXT, header + arr.tobytes())


NARROW_MIN_SIZE = 1024  # smaller arrays are not worth the check


def _narrow(arr: np.ndarray) -> np.ndarray | None:
    """A float array holding only whole numbers that fit uint8 or int16 (pixels, counts,
    token ids as floats), as that integer type: exactly the same values, 2-8x fewer bytes
    through base64, the broker and the worker's transport. None when it does not apply."""
    if arr.dtype.kind != "f" or arr.size < NARROW_MIN_SIZE:
        return None
    lo, hi = arr.min(), arr.max()  # NaN makes both comparisons below false
    target: np.dtype[Any]
    if lo >= 0 and hi <= 255:
        target = np.dtype("<u1")
    elif lo >= -32768 and hi <= 32767:
        target = np.dtype("<i2")
    else:
        return None
    narrow = arr.astype(target)
    if not np.array_equal(narrow, arr) or np.signbit(arr[narrow == 0]).any():
        return None  # fractions, or a -0.0 that would come back as +0.0
    return np.ascontiguousarray(narrow)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ND_EXT:
        raise CodecError(f"unknown msgpack extension {code}")
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
        kind, shape = header[:2]
        wire = header[2] if len(header) == 3 else kind
    except Exception as exc:
        raise CodecError("malformed array header") from exc
    if not isinstance(kind, str) or kind not in ALLOWED_DTYPES:
        raise CodecError(f"dtype {kind!r} is not allowed; only numeric dtypes travel")
    if wire != kind and (wire not in ("u1", "i2") or kind not in ("f2", "f4", "f8")):
        raise CodecError(f"wire dtype {wire!r} is not allowed for {kind!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise CodecError(f"bad array shape {shape!r}")
    dtype = np.dtype("<" + wire)
    offset = unpacker.tell()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        got = len(data) - offset
        raise CodecError(f"array of shape {shape} {wire} needs {expected} bytes, got {got}")
    arr = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    if wire == kind:
        return arr
    decoded = int(np.prod(shape, dtype=np.int64)) * np.dtype(kind).itemsize
    if decoded > _limits["max_bytes"]:  # widening must not escape the payload cap
        raise CodecError(f"array of shape {shape} {kind} would take {decoded} bytes, over "
                         f"the {_limits['max_bytes']}-byte cap")
    return arr.astype("<" + kind)


def dumps(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError) as exc:
        raise CodecError(str(exc)) from exc


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(data, str):
        data = data.encode("latin-1")
    max_bytes = _limits["max_bytes"]
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    try:
        return msgpack.unpackb(
data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises many types on garbage
        raise CodecError(f"not an inferq msgpack payload: {exc}") from exc


def register(max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Register the codec with kombu (idempotent) and set the payload cap."""
    from kombu.serialization import register as kombu_register

    _limits["max_bytes"] = max_bytes
    kombu_register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary")
