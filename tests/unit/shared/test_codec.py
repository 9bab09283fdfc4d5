"""The msgpack tensor codec: numeric arrays round-trip, anything else is refused."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu.serialization
import msgpack
import numpy as np
import pytest
from kombu.exceptions import ContentDisallowed, DecodeError

from shared import codec
from shared.celery_app import make_app
from shared.errors import CodecError
from shared.settings import load_settings

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]


class Gadget:
    """A class instance a hostile producer might pickle."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.fixture
def registered() -> Iterator[None]:
    """The codec registered with kombu; the default cap restored afterwards."""
    codec.register()
    try:
        yield
    finally:
        codec.register(codec.DEFAULT_MAX_BYTES)


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if dtype == "bool":
        return (np.arange(n) % 3 == 0).reshape(shape)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    values = np.linspace(0, 1, n) * float(info.max) / 2
    return values.astype(dtype).reshape(shape)


def _ext(header: list[object], body: bytes, code: int = 42) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(header) + body))


def _assert_same_array(got: object, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype.newbyteorder("=")
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# -- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_array_round_trips_in_nested_containers(dtype: str) -> None:
    a = _sample(dtype, (3, 4))
    b = _sample(dtype, (2, 1, 2))
    msg = {"job": "j1", "inputs": {"x": a}, "more": [b, {"deep": [a]}], "pair": (a, 7)}

    out = codec.loads(codec.dumps(msg))

    assert out["job"] == "j1"
    _assert_same_array(out["inputs"]["x"], a)
    _assert_same_array(out["more"][0], b)
    _assert_same_array(out["more"][1]["deep"][0], a)
    assert isinstance(out["pair"], list)  # msgpack has no tuple: tuples come back as lists
    _assert_same_array(out["pair"][0], a)
    assert out["pair"][1] == 7


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)])
@pytest.mark.parametrize("dtype", ["bool", "int64", "uint8", "float32"])
def test_empty_arrays_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    a = np.zeros(shape, dtype=dtype)
    _assert_same_array(codec.loads(codec.dumps(a)), a)


@pytest.mark.parametrize("dtype", ["bool", "int64", "float32"])
def test_zero_dim_arrays_round_trip(dtype: str) -> None:
    a = np.array(1, dtype=dtype)
    _assert_same_array(codec.loads(codec.dumps(a)), a)


def test_zero_dim_array_value_survives() -> None:
    """Whatever the shape, the single value of a 0-d array is not lost."""
    out = codec.loads(codec.dumps(np.array(2.5, dtype="float64")))
    assert out.size == 1
    assert float(out.reshape(())) == 2.5


@pytest.mark.parametrize("dtype", [">i2", ">i4", ">i8", ">u2", ">u4", ">u8", ">f2", ">f4", ">f8"])
def test_big_endian_arrays_arrive_with_the_same_values(dtype: str) -> None:
    a = (np.arange(12) * 3 + 1).astype(dtype).reshape(3, 4)
    out = codec.loads(codec.dumps({"a": a}))["a"]
    assert out.dtype == a.dtype.newbyteorder("<")
    np.testing.assert_array_equal(out, a)


def test_non_contiguous_and_fortran_arrays_round_trip() -> None:
    base = np.arange(60, dtype="float32").reshape(3, 4, 5)
    for view in (base[:, ::2, 1:], base.T, np.asfortranarray(base), base[::-1]):
        _assert_same_array(codec.loads(codec.dumps(view)), view)


def test_eight_dims_is_the_limit_that_still_travels() -> None:
    a = np.arange(2, dtype="int16").reshape((1,) * 7 + (2,))
    _assert_same_array(codec.loads(codec.dumps(a)), a)


def test_numpy_scalars_become_python_values() -> None:
    out = codec.loads(codec.dumps({
        "i": np.int64(-3), "u": np.uint8(200), "f32": np.float32(1.5), "f64": np.float64(0.25),
        "b": np.bool_(True),
    }))
    assert out == {"i": -3, "u": 200, "f32": 1.5, "f64": 0.25, "b": True}
    assert type(out["i"]) is int and type(out["b"]) is bool and type(out["f32"]) is float


def test_datetimes_uuids_decimals_and_sets_travel_as_plain_values() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    job = uuid.UUID(int=42)
    out = codec.loads(codec.dumps({"when": when, "day": dt.date(2024, 5, 6), "id": job,
                                   "price": decimal.Decimal("1.10"), "tags": {3, 1, 2},
                                   "none": None, "text": "é", "raw": b"\x00\xff"}))
    assert dt.datetime.fromisoformat(out["when"]) == when
    assert out["day"] == "2024-05-06"
    assert uuid.UUID(out["id"]) == job
    assert out["price"] == "1.10"
    assert sorted(out["tags"]) == [1, 2, 3]
    assert out["none"] is None and out["text"] == "é" and out["raw"] == b"\x00\xff"


def test_text_payload_is_read_as_latin1_bytes() -> None:
    body = codec.dumps({"x": np.arange(4, dtype="uint8")})
    out = codec.loads(body.decode("latin-1"))
    np.testing.assert_array_equal(out["x"], np.arange(4, dtype="uint8"))


# -- what is refused when encoding ---------------------------------------------------------
@pytest.mark.parametrize("arr", [
    np.array([object(), 1], dtype=object),
    np.array(["abc", "d"]),
    np.zeros(2, dtype="complex64"),
    np.zeros(2, dtype="V8"),
    np.array(["2024-01-01"], dtype="datetime64[D]"),
], ids=["object", "unicode", "complex", "void", "datetime64"])
def test_non_numeric_arrays_cannot_be_encoded(arr: np.ndarray) -> None:
    with pytest.raises(CodecError, match="not allowed"):
        codec.dumps({"x": [arr]})


def test_arbitrary_objects_cannot_be_encoded() -> None:
    with pytest.raises(CodecError, match="Gadget"):
        codec.dumps({"x": Gadget()})


# -- what is refused when decoding ---------------------------------------------------------
@pytest.mark.parametrize("obj", [{"a": 1, "b": [1, 2]}, Gadget()], ids=["dict", "instance"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_payloads_are_rejected(obj: object, protocol: int) -> None:
    with pytest.raises(CodecError):
        codec.loads(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("kind", ["O", "<U4", "U4", "V8", "c8", "M8[D]", "|O", "<f4"])
def test_ext_with_a_non_allowed_dtype_is_rejected(kind: str) -> None:
    with pytest.raises(CodecError, match="not allowed"):
        codec.loads(_ext([kind, [2]], b"\x00" * 16))


def test_unknown_extension_code_is_rejected() -> None:
    with pytest.raises(CodecError, match="extension"):
        codec.loads(_ext(["f4", [1]], b"\x00" * 4, code=7))


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb("f4"), msgpack.packb(["f4"])],
                         ids=["empty", "garbage", "not-a-list", "one-item"])
def test_malformed_array_header_is_rejected(data: bytes) -> None:
    with pytest.raises(CodecError):
        codec.loads(msgpack.packb(msgpack.ExtType(42, data)))


@pytest.mark.parametrize("nbytes", [0, 12, 15, 17, 20])
def test_shape_and_byte_count_mismatch_is_rejected(nbytes: int) -> None:
    with pytest.raises(CodecError, match="needs 16 bytes"):
        codec.loads(_ext(["f4", [2, 2]], b"\x00" * nbytes))


def test_matching_shape_and_byte_count_is_accepted() -> None:
    """The control for the mismatch cases: the same header with exactly 16 bytes decodes."""
    out = codec.loads(_ext(["f4", [2, 2]], np.ones(4, "<f4").tobytes()))
    np.testing.assert_array_equal(out, np.ones((2, 2), "float32"))


def test_more_than_eight_dims_is_rejected() -> None:
    with pytest.raises(CodecError, match="shape"):
        codec.loads(_ext(["u1", [1] * 9], b"\x00"))


@pytest.mark.parametrize("shape", [[-1, 4], [-2, -2], [2, -2], [2.0, 2], ["2", 2], 4, None])
def test_negative_or_non_integer_dims_are_rejected(shape: object) -> None:
    # [-2, -2] has a product of 4, so only the sign check can catch it
    with pytest.raises(CodecError, match="shape"):
        codec.loads(_ext(["u1", shape], b"\x00" * 4))


@pytest.mark.parametrize("shape", [[2**62 + 1, 4], [2**63, 2], [2**32, 2**32, 1]])
def test_overflowing_dims_are_rejected(shape: list[int]) -> None:
    # 2**62+1 rows of 4 wraps to 4 in int64: the byte count alone would let it through
    with pytest.raises(CodecError):
        codec.loads(_ext(["u1", shape], b"\x00" * 4))


def test_payload_over_the_cap_is_rejected(registered: None) -> None:
    small = codec.dumps({"x": np.zeros(100, dtype="uint8")})
    big = codec.dumps({"x": np.zeros(5000, dtype="uint8")})
    codec.register(max_bytes=1024)
    assert len(small) < 1024 < len(big)
    np.testing.assert_array_equal(codec.loads(small)["x"], np.zeros(100, "uint8"))
    with pytest.raises(CodecError, match="1024-byte cap"):
        codec.loads(big)
    with pytest.raises(DecodeError, match="cap"):
        kombu.serialization.loads(big, codec.CONTENT_TYPE, "binary", accept=[codec.CONTENT_TYPE])
    codec.register(codec.DEFAULT_MAX_BYTES)
    assert codec.loads(big)["x"].shape == (5000,)


# -- through kombu --------------------------------------------------------------------------
def test_kombu_round_trip(registered: None) -> None:
    msg = {"inputs": {"image": np.arange(64, dtype="float32").reshape(1, 1, 8, 8)},
           "rows": [1, 2], "meta": {"model": "digits@1"}}
    content_type, encoding, body = kombu.serialization.dumps(msg, serializer=codec.SERIALIZER)
    assert content_type == codec.CONTENT_TYPE
    assert b"pickle" not in body and b"numpy" not in body

    out = kombu.serialization.loads(body, content_type, encoding, accept=[codec.CONTENT_TYPE])

    assert out["rows"] == [1, 2] and out["meta"] == {"model": "digits@1"}
    _assert_same_array(out["inputs"]["image"], msg["inputs"]["image"])


def test_kombu_refuses_pickle_bodies(registered: None) -> None:
    assert not any("pickle" in name for name in codec.ACCEPT)
    body = pickle.dumps({"a": 1})
    with pytest.raises(ContentDisallowed):
        kombu.serialization.loads(body, "application/x-python-serialize", "binary",
                                  accept=codec.ACCEPT)


def test_kombu_refuses_inferq_bodies_when_not_accepted(registered: None) -> None:
    _, encoding, body = kombu.serialization.dumps({"a": 1}, serializer=codec.SERIALIZER)
    with pytest.raises(ContentDisallowed):
        kombu.serialization.loads(body, codec.CONTENT_TYPE, encoding, accept=["json"])


def test_celery_app_never_speaks_pickle_and_acks_late(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("INFERQ_")]:
        monkeypatch.delenv(var)
    try:
        app = make_app(load_settings(home=tmp_path))
        conf = app.conf
        for key in ("accept_content", "result_accept_content"):
            values = list(conf[key])
            assert values, key
            assert not any("pickle" in v or "python-serialize" in v for v in values), key
            assert codec.CONTENT_TYPE in values, key
        assert conf.task_serializer == codec.SERIALIZER
        assert conf.result_serializer == codec.RESULT_SERIALIZER
        assert app.control.mailbox.serializer == "json"  # what `celery inspect` speaks
        assert "pickle" not in conf.task_serializer and "pickle" not in conf.result_serializer
        assert conf.task_acks_late is True
        assert conf.task_reject_on_worker_lost is True
        assert conf.worker_prefetch_multiplier == 1
        assert (tmp_path / "results").is_dir()
    finally:
        codec.register(codec.DEFAULT_MAX_BYTES)


# -- narrowed float arrays -------------------------------------------------------------------
@pytest.mark.parametrize("values, width", [
    (np.arange(2048) % 17, 1),  # digits pixels: uint8
    (np.arange(-1024, 1024), 2),  # int16
])
def test_whole_number_floats_travel_narrow_and_come_back_exact(values, width) -> None:
    arr = values.astype(np.float32).reshape(-1, 64)
    blob = codec.dumps({"x": arr})
    back = codec.loads(blob)["x"]
    assert back.dtype == np.float32 and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert len(blob) <= arr.size * width + 64  # 1 or 2 bytes a value instead of 4


@pytest.mark.parametrize("arr", [
    np.full(2048, 0.5, np.float32),  # fractions
    np.full(2048, 70_000.0, np.float32),  # out of int16 range
    np.concatenate([np.zeros(2047, np.float32), [np.nan]]).astype(np.float32),
    np.concatenate([np.zeros(2047), [-0.0]]).astype(np.float64),  # the sign of zero
    np.concatenate([np.zeros(2047), [np.inf]]).astype(np.float32),
], ids=["fraction", "range", "nan", "negative-zero", "inf"])
def test_values_a_narrow_type_cannot_hold_travel_as_they_are(arr) -> None:
    blob = codec.dumps(arr)
    assert len(blob) >= arr.nbytes
    back = codec.loads(blob)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(np.signbit(back), np.signbit(arr))
    np.testing.assert_array_equal(back, arr)


def test_a_narrow_header_naming_another_wire_type_is_refused() -> None:
    header = msgpack.packb(["f4", [4], "f8"])
    blob = msgpack.packb(msgpack.ExtType(42, header + b"\0" * 32), use_bin_type=True)
    with pytest.raises(CodecError, match="wire dtype"):
        codec.loads(blob)


@pytest.mark.parametrize("result_format", codec.RESULT_FORMATS)
def test_results_written_in_either_format_read_back_by_one_reader(result_format: str) -> None:
    record = {"outputs": {"label": np.array([3, 1], dtype=np.int64),
                          "probabilities": np.array([[0.25, 0.75]], dtype=np.float32)},
              "errors": {}, "rows": 2}
    try:
        codec.register(codec.DEFAULT_MAX_BYTES, result_format)
        _, _, body = kombu.serialization.dumps(record, serializer=codec.RESULT_SERIALIZER)
        back = kombu.serialization.loads(body, codec.RESULT_CONTENT_TYPE, "binary",
                                         accept=[codec.RESULT_CONTENT_TYPE])
    finally:
        codec.register(codec.DEFAULT_MAX_BYTES)
    assert np.asarray(back["outputs"]["label"]).tolist() == [3, 1]
    assert np.asarray(back["outputs"]["probabilities"]).tolist() == [[0.25, 0.75]]
    if result_format == "json":  # what a plain Celery client (result_serializer="json") reads
        assert json.loads(body) == {"outputs": {"label": [3, 1],
                                                "probabilities": [[0.25, 0.75]]},
                                    "errors": {}, "rows": 2}


def test_result_reader_refuses_garbage_in_one_error() -> None:
    for body in (b"{not json", b"{" + b"[" * 100_000, b"\xc1garbage"):
        with pytest.raises(CodecError):
            codec.result_loads(body)
