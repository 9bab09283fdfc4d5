"""Hostile payloads against the codec's decode path (what ``codec.register`` gives kombu as
``loads``): random bytes, pickles, disallowed and structured dtypes, lying shapes and sizes,
bad narrowed headers, depth and container bombs, huge declared lengths. Each one is refused
with a CodecError naming the problem (or, for random bytes that happen to be valid msgpack,
decodes to plain values), within a memory bound measured with tracemalloc. And every valid
array of an allowed dtype survives encode -> decode bit for bit.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.extra.numpy as hnp
import kombu.serialization
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.exceptions import DecodeError

from shared import codec
from shared.errors import CodecError

PROFILE = settings(max_examples=200, deadline=None, derandomize=True)
DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]
# Decoded objects may cost a small multiple of the payload (a list slot is 8 bytes for a
# 1-byte nil); refusals must stay within this, plus a fixed slack for the interpreter.
BLOWUP = 16
SLACK = 512 * 1024


@pytest.fixture(autouse=True)
def default_cap() -> Iterator[None]:
    """Every test starts and ends with the default payload cap registered."""
    codec.register(codec.DEFAULT_MAX_BYTES)
    yield
    codec.register(codec.DEFAULT_MAX_BYTES)


def ext(header: Any, body: bytes = b"", code: int = 42) -> bytes:
    """An ext32 of ``code`` (negative ones too, which msgpack.ExtType refuses to build)."""
    data = msgpack.packb(header) + body
    return b"\xc9" + struct.pack(">Ib", len(data), code) + data


def decode_peak(body: bytes) -> tuple[Any, int]:
    """``(loads(body) or the exception it raised, peak bytes traced while decoding)``."""
    tracemalloc.start()
    try:
        try:
            out: Any = codec.loads(body)
        except Exception as exc:  # noqa: BLE001 - returned for the caller to check
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_refused(body: bytes, match: str) -> None:
    """Refused with a CodecError whose message matches, within the memory bound."""
    out, peak = decode_peak(body)
    assert isinstance(out, CodecError), f"not refused: {type(out).__name__} {out!r:.200}"
    assert re.search(match, str(out)), f"{out} does not say {match!r}"
    assert peak <= BLOWUP * len(body) + SLACK, f"peak {peak} for a {len(body)}-byte body"


def assert_plain(value: Any, depth: int = 0) -> None:
    """What a decode may return: msgpack's plain values and arrays of allowed dtypes."""
    assert depth < 1100
    if isinstance(value, dict):
        for k, v in value.items():
            assert_plain(k, depth + 1)
            assert_plain(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v, depth + 1)
    elif isinstance(value, np.ndarray):
        assert value.dtype.str.lstrip("<>|=") in codec.ALLOWED_DTYPES
        assert value.dtype.isnative and value.dtype.fields is None
        assert value.ndim <= 8
        if value.dtype == bool:
            assert value.view(np.uint8).max(initial=0) <= 1
    else:
        # msgpack.Timestamp: ext -1 is decoded by msgpack itself (an inert value object).
        assert value is None or isinstance(
            value, (bool, int, float, str, bytes, msgpack.Timestamp)), type(value)


# -- random and arbitrary input ---------------------------------------------------------------
@PROFILE
@given(body=st.binary(max_size=600))
def test_random_bytes_decode_to_plain_values_or_a_codec_error(body: bytes) -> None:
    try:
        out = codec.loads(body)
    except CodecError as exc:
        assert str(exc)
    else:
        assert_plain(out)


@PROFILE
@given(body=st.binary(min_size=1, max_size=200), prefix=st.sampled_from(
    [b"\x2a", b"\xc7", b"\xc8", b"\xc9", b"\xd4\x2a", b"\xd6\x2a", b"\xd8\x2a", b"\xdd",
     b"\xdf", b"\xdb", b"\xc6", b"\x91\x91\x91"]))
def test_random_bytes_behind_container_and_extension_headers(prefix: bytes,
                                                             body: bytes) -> None:
    try:
        out = codec.loads(prefix + body)
    except CodecError as exc:
        assert str(exc)
    else:
        assert_plain(out)


def headers() -> st.SearchStrategy[Any]:
    """Array headers from sane to absurd: kinds, shapes and wire types of every sort."""
    kinds = st.sampled_from(sorted(codec.ALLOWED_DTYPES) + [
        "O", "|O", "O8", "<U4", "U4", "S4", "|S4", "a4", "V8", "|V8", "c8", "c16", "M8[D]",
        "m8[s]", "f16", "g", "<f4", ">i4", "=i4", "i4,i4", "(2,)i4", "P", "p", "", "b", "f",
        "u1\x00", "float32"]) | st.text(max_size=6) | st.integers() | st.none() | \
        st.lists(st.tuples(st.text(max_size=2), st.sampled_from(["<i4", "O", "U2"])),
                 max_size=2)
    dims = st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.integers(-2, 8) | \
        st.booleans() | st.floats(allow_nan=True) | st.text(max_size=2) | st.none()
    shapes = st.lists(dims, max_size=10) | st.integers() | st.none() | st.text(max_size=3)
    wires = st.sampled_from(["u1", "i2", "u2", "f8", "f4", "O", "b1"]) | st.none() | \
        st.integers() | st.lists(st.just("u1"), max_size=2)
    return st.one_of(
        st.tuples(kinds, shapes).map(list),
        st.tuples(kinds, shapes, wires).map(list),
        st.lists(st.none() | st.integers() | st.text(max_size=3), max_size=5),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
        kinds,
    )


@PROFILE
@given(header=headers(), body=st.binary(max_size=64),
       code=st.sampled_from([42, 42, 42, 0, 1, 41, 43, 127, -2, -128]))
def test_array_extensions_with_arbitrary_headers(header: Any, body: bytes, code: int) -> None:
    try:
        blob = ext(header, body, code)
    except (TypeError, ValueError, OverflowError):
        return  # msgpack cannot even write it
    try:
        out = codec.loads(blob)
    except CodecError as exc:
        assert str(exc)
        return
    assert code == 42
    assert_plain(out)
    kind = header[0]
    assert out.dtype == np.dtype("<" + kind) and list(out.shape) == header[1]


@PROFILE
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() |
    st.text(max_size=5) | st.binary(max_size=5) |
    st.builds(lambda h, b: msgpack.ExtType(42, h + b),
              st.sampled_from([msgpack.packb(h) for h in (["u1", [2]], ["f4", [1, 1]],
                                                          ["f8", [2], "u1"], ["O", [1]],
                                                          ["b1", [2]], ["i8", [-1]])]),
              st.binary(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=3) | st.integers(-(2**63), 2**64 - 1), inner, max_size=4),
    max_leaves=30))
def test_nested_messages_with_arrays_good_and_bad(value: Any) -> None:
    try:
        out = codec.loads(msgpack.packb(value, use_bin_type=True))
    except CodecError as exc:
        assert str(exc)
    else:
        assert_plain(out)


# -- pickle ------------------------------------------------------------------------------------
RAN: list[str] = []


def _record(what: str) -> str:
    RAN.append(what)
    return what


class Exploit:
    """Unpickling this calls ``_record``: proof that a payload ran code."""

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return _record, ("unpickled",)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("obj", [Exploit(), {"task": Exploit()}, [1, Exploit()], None, 7],
                         ids=["exploit", "in-dict", "in-list", "none", "int"])
def test_pickles_are_refused_and_never_run(protocol: int, obj: Any) -> None:
    RAN.clear()
    assert_refused(pickle.dumps(obj, protocol=protocol), "after its end|not an inferq")
    assert RAN == []
    assert pickle.loads(pickle.dumps(Exploit(), protocol=protocol)) == "unpickled"  # control
    RAN.clear()


@pytest.mark.parametrize("op", sorted({o.code for o in pickletools.opcodes}),
                         ids=lambda c: f"{ord(c):#04x}")
def test_pickle_opcodes_are_refused(op: str) -> None:
    """Each opcode, then a byte msgpack never uses: read as msgpack, every opcode is a
    scalar (then trailing bytes) or a list or map header (then garbage), never code."""
    assert_refused(op.encode("latin-1") + b"\xc1.", "after its end|not an inferq")


def test_kombu_does_not_unpickle_for_the_inferq_content_type() -> None:
    RAN.clear()
    with pytest.raises(DecodeError):
        kombu.serialization.loads(pickle.dumps(Exploit()), codec.CONTENT_TYPE, "binary",
                                  accept=[codec.CONTENT_TYPE])
    assert RAN == []


# -- dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [
    "O", "|O", "O8", "<U4", "U4", "|U1", "S4", "|S4", "a4", "V8", "|V8", "c8", "c16", "M8[D]",
    "m8[s]", "f16", "g", "<f4", ">f4", "=i4", "i4,i4", "(2,)i4", "[('a','<i4')]", "P", "p",
    "", "f", "float32", "u1\x00", "U", "S", "V",
])
def test_object_text_void_and_other_dtypes_are_refused(kind: str) -> None:
    assert_refused(ext([kind, [2]], b"\x00" * 16), "not allowed")


@pytest.mark.parametrize("kind", [
    [["a", "<i4"], ["b", "O"]], {"names": ["a"], "formats": ["O"]}, ["<i4", [2]], 4, None,
    b"f4", True,
], ids=repr)
def test_structured_and_non_text_dtype_descriptions_are_refused(kind: Any) -> None:
    assert_refused(ext([kind, [1]], b"\x00" * 8), "not allowed|malformed array header")


# -- shapes and sizes ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [
    [-1], [-1, -4], [2, -2], [2**63], [2**64 - 1], [2**63, 2], [2**62 + 1, 4],
    [2**32, 2**32, 1], [0, 2**64 - 1], [2**40, 0], [2**31] * 2 + [0], [True, 4], [False],
    [1.0, 4], [4.0], ["4"], [None], [[2]], [{}], [1] * 9, [0] * 9, 4, None, "4", {"0": 4},
    [float("nan")], [float("inf")],
], ids=repr)
def test_shapes_that_lie_overflow_or_are_not_integers_are_refused(shape: Any) -> None:
    assert_refused(ext(["u1", shape], b"\x00" * 4), "shape|malformed")


@pytest.mark.parametrize("shape, kind, nbytes", [
    ([1000], "f8", 8), ([2**20], "u1", 0), ([2, 2], "f4", 15), ([2, 2], "f4", 17),
    ([8], "i8", 0), ([0], "u1", 1), ([], "f8", 4), ([3, 1024, 1024], "u1", 1024),
])
def test_declared_sizes_that_the_body_does_not_hold_are_refused(shape: list[int], kind: str,
                                                                nbytes: int) -> None:
    assert_refused(ext([kind, shape], b"\x00" * nbytes), "needs .* bytes, got")


@pytest.mark.parametrize("header", [
    ["f4", [4], "u2"], ["i4", [4], "u1"], ["u1", [4], "u1 "], ["f4", [4], "f8"],
    ["f4", [4], "O"], ["f4", [4], None], ["f4", [4], ["u1"]], ["f4", [4], 1], ["b1", [4], "u1"],
    ["f8", [4], "i4"], ["f2", [4], "U1"],
], ids=repr)
def test_narrowed_headers_with_bad_wire_types_are_refused(header: list[Any]) -> None:
    assert_refused(ext(header, b"\x00" * 16), "wire dtype")


@pytest.mark.parametrize("header, body, match", [
    (["f4", [4], "u1", "extra"], b"\x00" * 4, "malformed"),
    (["f8", [2**20], "u1"], b"\x00" * 16, "needs"),
    (["f8", [-4], "u1"], b"\x00" * 4, "shape"),
    (["f8", [2**62 + 1, 4], "i2"], b"\x00" * 8, "shape"),
    (["f4"], b"", "malformed"), ([], b"", "malformed"), ("f4", b"", "malformed"),
], ids=lambda v: repr(v)[:30])
def test_narrowed_headers_with_bad_shapes_are_refused(header: Any, body: bytes,
                                                      match: str) -> None:
    assert_refused(ext(header, body), match)


def test_widening_is_capped_over_the_whole_payload() -> None:
    """Each narrowed array alone fits the cap once widened; together they do not."""
    one = msgpack.ExtType(42, msgpack.packb(["f8", [4096], "u1"]) + bytes(4096))
    codec.register(max_bytes=64 * 1024)
    assert codec.loads(msgpack.packb([one]))[0].nbytes == 32 * 1024  # 32 KiB: fits
    assert codec.loads(msgpack.packb([one, one]))[1].nbytes == 32 * 1024  # 64 KiB: fits
    assert_refused(msgpack.packb([one, one, one]), "over the 65536-byte cap")


def test_a_wide_array_is_refused_before_it_is_widened() -> None:
    codec.register(max_bytes=1024 * 1024)
    body = ext(["f8", [512 * 1024], "u1"], bytes(512 * 1024))  # 4 MiB once widened
    out, peak = decode_peak(body)
    assert isinstance(out, CodecError) and "cap" in str(out)
    assert peak < 2 * len(body) + SLACK


def test_bool_arrays_hold_only_zeros_and_ones() -> None:
    assert codec.loads(ext(["b1", [3]], b"\x00\x01\x00")).tolist() == [False, True, False]
    assert_refused(ext(["b1", [3]], b"\x00\x02\x01"), "bool array")


# -- bombs ---------------------------------------------------------------------------------------
def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


BOMBS = {
    "list-depth-100k": (b"\x91" * 100_000 + b"\xc0", "nested too deeply"),
    "list-depth-2k": (b"\x91" * 2_000 + b"\xc0", "nested too deeply"),
    "map-depth-100k": (b"\x81\xc0" * 100_000 + b"\xc0", "nested too deeply"),
    "mixed-depth": ((b"\x91\x81\xa1k") * 5_000 + b"\xc0", "nested too deeply"),
    "declared-array32-nest": ((b"\xdd" + _u32(5_000)) * 1_000, "truncated"),
    "declared-map32-nest": ((b"\xdf" + _u32(2_500)) * 1_000, "truncated"),
    "declared-array-1m-nest": (((b"\xdd" + _u32(2**20)) * 1_000).ljust(2**20, b"\xc0"),
                               "truncated"),
    "array32-max": (b"\xdd\xff\xff\xff\xff\xc0", "truncated"),
    "map32-max": (b"\xdf\xff\xff\xff\xff\xc0\xc0", "truncated"),
    "str32-max": (b"\xdb\xff\xff\xff\xffabc", "truncated"),
    "bin32-max": (b"\xc6\xff\xff\xff\xffabc", "truncated"),
    # msgpack's skip reads a 2**32-1 ext length as 0 (the type byte wraps it): the
    # trailing bytes, or unpackb's length check, still refuse it.
    "ext32-max": (b"\xc9\xff\xff\xff\xff\x2aabc", "truncated|after its end"),
    "ext32-max-alone": (b"\xc9\xff\xff\xff\xff", "max_ext_len"),
    "ext32-in-list": (b"\x92\xc0\xc9\x7f\xff\xff\xff\x2a", "truncated"),
    "empty-lists": (b"\xdd" + _u32(2**20) + b"\x90" * 2**20, "lists and maps"),
    "empty-maps": (b"\xdd" + _u32(2**20) + b"\x80" * 2**20, "lists and maps"),
    "one-item-lists": (b"\xdd" + _u32(2**19) + b"\x91\xc0" * 2**19, "lists and maps"),
    "map-of-lists": (b"\xdf" + _u32(2**19) + b"".join(
        b"\xcd" + struct.pack(">H", i % 65536) + b"\x90" for i in range(2**19)),
        "lists and maps"),
    "array16-of-empty-lists": (b"\xdc" + struct.pack(">H", 60_000) + b"\x90" * 60_000,
                               "lists and maps"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_within_the_memory_bound(name: str) -> None:
    body, match = BOMBS[name]
    assert_refused(body, match)


def test_a_declared_length_bomb_is_refused_before_anything_is_built() -> None:
    """1,000 nested lists each declaring 5,000 items: 40 MB of list slots before the fix,
    for a 5 KB body. Refused now having allocated little more than a copy of the body."""
    body, _ = BOMBS["declared-array32-nest"]
    out, peak = decode_peak(body)
    assert isinstance(out, CodecError)
    assert peak < 2 * len(body) + SLACK, peak


def test_many_small_containers_below_the_budget_still_decode() -> None:
    """The control: 1,000 empty lists fit the allowance every payload has."""
    assert codec.loads(msgpack.packb([[] for _ in range(1000)])) == [[]] * 1000
    rows = [{"row": i, "field": "x", "message": f"row {i}: bad"} for i in range(5000)]
    assert codec.loads(codec.dumps({"errors": rows}))["errors"] == rows


@pytest.mark.parametrize("body, match", [
    (b"", "empty"), (b"\xc1", "not an inferq"), (b"\x92\x01", "truncated"),
    (b"\x01\x02", "after its end"), (b"\xa2\xff\xfe", "not an inferq"),
    (msgpack.packb({"a": 1})[:-1], "truncated"), (b"\x81\x91\x01\x02", "not an inferq"),
    (ext(["u1", [1]], b"\x00", code=7), "unknown msgpack extension 7"),
    (ext(["u1", [1]], b"\x00", code=-5), "unknown msgpack extension -5"),
    (b"\xd4\xff\x00", "not an inferq"),  # a timestamp of the wrong length
], ids=["empty", "reserved-byte", "short-list", "trailing", "bad-utf8", "cut-map",
        "list-as-key", "ext-7", "ext-minus-5", "bad-timestamp"])
def test_garbage_is_refused_with_a_message_that_names_it(body: bytes, match: str) -> None:
    assert_refused(body, match)


def test_text_payloads_that_are_not_latin1_are_refused() -> None:
    with pytest.raises(CodecError, match="latin-1"):
        codec.loads("\u0101\u0102")


def test_over_the_cap_is_refused_before_decoding() -> None:
    codec.register(max_bytes=1024)
    out, peak = decode_peak(b"\x90" * 4096)
    assert isinstance(out, CodecError) and "1024-byte cap" in str(out)
    assert peak < SLACK


# -- round trips -----------------------------------------------------------------------------------
def exact(want: np.ndarray, got: Any) -> None:
    assert isinstance(got, np.ndarray)
    native = want.dtype.newbyteorder("=")
    assert got.dtype == native and got.shape == want.shape
    assert np.ascontiguousarray(want.astype(native)).tobytes() == got.tobytes()


@PROFILE
@given(arr=st.sampled_from(DTYPES).flatmap(lambda d: hnp.arrays(
    np.dtype(d), hnp.array_shapes(min_dims=0, max_dims=8, min_side=0, max_side=4))),
       order=st.sampled_from(["<", ">"]), view=st.sampled_from(["as-is", "T", "reversed"]))
def test_any_allowed_array_round_trips_exactly(arr: np.ndarray, order: str, view: str) -> None:
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(order))
    if view == "T":
        arr = arr.T
    elif view == "reversed" and arr.ndim:
        arr = arr[::-1]
    exact(arr, codec.loads(codec.dumps(arr)))
    exact(arr, codec.loads(codec.dumps({"inputs": {"x": [arr, {"y": arr}]}}))["inputs"]["x"][1]
          ["y"])


@PROFILE
@given(dtype=st.sampled_from(["float16", "float32", "float64"]),
       size=st.integers(1024, 3000), seed=st.integers(0, 2**32 - 1),
       span=st.sampled_from([(0, 256), (-300, 300), (-2048, 2048), (-32768, 32768)]),
       spoil=st.sampled_from([None, 0.5, -0.0, float("nan"), float("inf"), 40000.0]))
def test_whole_number_floats_round_trip_exactly_through_narrowing(
        dtype: str, size: int, seed: int, span: tuple[int, int], spoil: float | None) -> None:
    """Whole numbers travel as u1 or i2 (built with numpy: hypothesis drawing thousands of
    elements one by one would take most of a minute)."""
    arr = np.random.default_rng(seed).integers(*span, size=size).astype(dtype)
    if spoil is not None:
        arr[size // 2] = spoil
    blob = codec.dumps(arr)
    if spoil is None:
        assert len(blob) < arr.nbytes or arr.dtype.itemsize == 2  # it did travel narrowed
    got = codec.loads(blob)
    exact(arr, got)
    assert np.array_equal(np.signbit(got), np.signbit(arr))
