"""The msgpack tensor codec: numeric numpy arrays travel as raw bytes, never pickle.

An array is a msgpack extension (code 42) holding ``[dtype, shape]`` and the raw
little-endian bytes; a float array of whole numbers may travel narrowed, as
``[dtype, shape, "u1" | "i2"]`` and bytes of that type, and is decoded back to ``dtype``.
Decoding checks the dtype against a numeric allow-list, the shape against the byte
count, the whole payload against a size cap, every declared length against the bytes that
back it (before anything is built), and the number of lists and maps and of widened bytes
against budgets, so a hostile message can neither run code nor make a worker allocate
more than a small multiple of its size.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
import uuid
from typing import Any

import msgpack
import numpy as np

from shared.errors import CodecError

CONTENT_TYPE = "application/x-inferq-msgpack"
SERIALIZER = "inferq-msgpack"
ACCEPT = ["json", CONTENT_TYPE]  # never pickle
# Results: written as msgpack (default) or JSON (INFERQ_RESULT_SERIALIZER=json, readable by a
# plain Celery client with result_serializer="json"); read back as either.
RESULT_SERIALIZER = "inferq-result"
RESULT_CONTENT_TYPE = "application/x-inferq-result"
RESULT_FORMATS = ("msgpack", "json")

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


_MAX_HEADER = 128  # bytes: [dtype, 8 dims of 9 bytes each, wire dtype] needs under 90
_CONTAINER_BYTES = 16  # a payload may hold one list or map per this many bytes ...
_CONTAINER_SLACK = 1024  # ... plus this many (a Celery envelope has a few empty ones)


class _Decoding:
    """One payload's decode, within its budgets: lists and maps (an empty list costs 64
    bytes of memory for 1 byte of payload), and bytes added by widening narrowed arrays."""

    def __init__(self, size: int, max_bytes: int):
        self.size = size
        self.max_bytes = max_bytes
        self.containers_left = _CONTAINER_SLACK + size // _CONTAINER_BYTES
        self.widen_left = max_bytes

    def container(self, obj: Any) -> Any:
        self.containers_left -= 1
        if self.containers_left < 0:
            raise CodecError(
                f"payload of {self.size} bytes holds over "
                f"{_CONTAINER_SLACK + self.size // _CONTAINER_BYTES} lists and maps (at most "
                f"one per {_CONTAINER_BYTES} bytes, plus {_CONTAINER_SLACK}): refused as a "
                "decompression bomb")
        return obj

    def ext(self, code: int, data: bytes) -> np.ndarray:
        if code != _ND_EXT:
            raise CodecError(f"unknown msgpack extension {code}; only arrays ({_ND_EXT}) travel")
        kind, shape, wire, offset = _array_header(data, self.max_bytes)
        dtype = np.dtype("<" + wire)
        count = math.prod(shape)  # Python ints: a product cannot wrap around
        expected = count * dtype.itemsize
        if len(data) - offset != expected:
            raise CodecError(f"array of shape {shape} {wire} needs {expected} bytes, "
                             f"got {len(data) - offset}")
        arr = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
        if wire == "b1" and arr.view(np.uint8).max(initial=0) > 1:
            raise CodecError("bool array holds bytes other than 0 and 1")
        if wire == kind:
            return arr
        decoded = count * np.dtype(kind).itemsize
        if decoded > self.widen_left:  # widening must not escape the payload cap
            raise CodecError(f"array of shape {shape} {kind} would take {decoded} bytes; "
                             f"with the payload's other widened arrays that is over the "
                             f"{self.max_bytes}-byte cap")
        self.widen_left -= decoded
        return arr.astype("<" + kind)


def _array_header(data: bytes, max_bytes: int) -> tuple[str, list[int], str, int]:
    """``[kind, shape]`` or ``[kind, shape, wire]`` at the start of an array extension,
    checked, and the offset of the raw bytes after it."""
    unpacker = msgpack.Unpacker(max_buffer_size=_MAX_HEADER, max_array_len=2 * _MAX_NDIM,
                                max_map_len=0, max_str_len=16, max_bin_len=0, max_ext_len=0)
    unpacker.feed(data[:_MAX_HEADER])
    try:
        header = unpacker.unpack()
    except Exception as exc:  # msgpack raises many types on garbage
        raise CodecError(f"malformed array header: {type(exc).__name__} {exc}") from None
    if not isinstance(header, list) or len(header) not in (2, 3):
        raise CodecError(f"malformed array header {header!r}: want [dtype, shape] or "
                         "[dtype, shape, wire dtype]")
    kind, shape = header[:2]
    wire = header[2] if len(header) == 3 else kind
    if not isinstance(kind, str) or kind not in ALLOWED_DTYPES:
        raise CodecError(f"dtype {kind!r} is not allowed; only numeric dtypes travel")
    if wire != kind and (wire not in ("u1", "i2") or kind not in ("f2", "f4", "f8")):
        raise CodecError(f"wire dtype {wire!r} is not allowed for {kind!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
            type(d) is int and 0 <= d <= max_bytes for d in shape):
        raise CodecError(f"bad array shape {shape!r}: up to {_MAX_NDIM} dims, each an "
                         f"integer from 0 to {max_bytes}")
    return kind, shape, wire, unpacker.tell()


def _check_structure(data: bytes | bytearray | memoryview) -> None:
    """Walk the payload without building anything (msgpack's C skip): a list or map whose
    declared length its bytes do not back, or nesting past msgpack's stack, is refused
    before anything is allocated for it."""
    walker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    walker.feed(data)
    try:
        walker.skip()
    except msgpack.OutOfData:
        if not data:
            raise CodecError("empty payload: not an inferq message") from None
        raise CodecError(f"truncated payload: its {len(data)} bytes hold less than it "
                         "declares") from None
    except msgpack.StackError:
        raise CodecError("payload nested too deeply: lists or maps over 1,000 levels deep"
                         ) from None
    except Exception as exc:  # msgpack raises many types on garbage
        raise CodecError(f"not an inferq msgpack payload: {type(exc).__name__} {exc}"
                         ) from None
    if walker.tell() != len(data):
        raise CodecError(f"not an inferq msgpack payload: {len(data) - walker.tell()} "
                         "bytes after its end")


def dumps(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError) as exc:
        raise CodecError(str(exc)) from exc


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Celery's deserializer: plain values and arrays of the allowed dtypes, or CodecError."""
    max_bytes = _limits["max_bytes"]
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    if isinstance(data, str):
        try:
            data = data.encode("latin-1")
        except UnicodeEncodeError:
            raise CodecError("text payload is not latin-1 bytes: not an inferq message"
                             ) from None
    _check_structure(data)
    decoding = _Decoding(len(data), max_bytes)
    try:
        return msgpack.unpackb(data, ext_hook=decoding.ext, list_hook=decoding.container,
                               object_hook=decoding.container, raw=False,
                               strict_map_key=False)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises many types on garbage
        raise CodecError(f"not an inferq msgpack payload: {type(exc).__name__} {exc}"
                         ) from exc


def json_dumps(obj: Any) -> bytes:
    """JSON for Celery's own tools and plain clients: arrays as nested lists."""
    try:
        return json.dumps(obj, default=_json_default, separators=(",", ":"),
                          allow_nan=True).encode()
    except (TypeError, ValueError) as exc:
        raise CodecError(str(exc)) from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("latin-1")
    return _default(obj)


def result_loads(data: bytes | bytearray | memoryview | str) -> Any:
    """A stored result in either format: a JSON document starts with ``{``, which no
    msgpack map (a result record) does."""
    head = bytes(data[:1]) if not isinstance(data, str) else data[:1].encode()
    if head != b"{":
        return loads(data)
    if len(data) > _limits["max_bytes"]:
        raise CodecError(f"payload of {len(data)} bytes exceeds the cap")
    try:
        return json.loads(bytes(data) if not isinstance(data, str) else data)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"not a JSON result: {exc}") from exc


def register(max_bytes: int = DEFAULT_MAX_BYTES, result_format: str = "msgpack") -> None:
    """Register the codecs with kombu (idempotent) and set the payload cap.

    Messages are always msgpack; results are written in ``result_format`` and read in
    either. Numpy values also become plain JSON wherever Celery itself writes JSON
    (control replies, events), so its tools can read them.
    """
    from kombu.serialization import register as kombu_register
    from kombu.utils.json import register_type

    if result_format not in RESULT_FORMATS:
        raise ValueError(f"result format must be one of {list(RESULT_FORMATS)}")
    _limits["max_bytes"] = max_bytes
    kombu_register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary")
    kombu_register(RESULT_SERIALIZER, json_dumps if result_format == "json" else dumps,
                   result_loads, content_type=RESULT_CONTENT_TYPE, content_encoding="binary")
    register_type(np.ndarray, None, lambda arr: arr.tolist())
    register_type(np.generic, None, lambda value: value.item())  # type: ignore[type-abstract]
