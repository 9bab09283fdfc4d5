"""Inputs are checked against the manifest per row; one bad row never sinks its neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import InputError
from shared.schemas import TensorSpec
from shared.validation import as_row, check_rows

IMAGE = TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])
COUNTS = TensorSpec(name="counts", dtype="int64", shape=[-1, 4])


# -- as_row ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    list(range(64)),
    [list(range(8 * i, 8 * i + 8)) for i in range(8)],
    np.arange(64, dtype=np.float64),
    np.arange(64, dtype=np.int32).reshape(1, 8, 8),
], ids=["flat-list", "nested-list", "float64-array", "int32-shaped"])
def test_as_row_reshapes_and_casts_to_the_row_shape(value: object) -> None:
    arr = as_row(IMAGE, value)
    assert arr.shape == (1, 8, 8)
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr.ravel(), np.arange(64, dtype=np.float32))


def test_as_row_keeps_an_exact_match() -> None:
    value = np.ones((1, 8, 8), np.float32)
    assert as_row(IMAGE, value) is value


@pytest.mark.parametrize("count", [0, 1, 63, 65, 128])
def test_as_row_rejects_a_wrong_value_count(count: int) -> None:
    with pytest.raises(InputError) as info:
        as_row(IMAGE, list(range(count)), row=7)
    message = str(info.value)
    assert "row 7" in message
    assert "'image'" in message
    assert "(1, 8, 8)" in message and "64 values" in message
    assert info.value.row == 7 and info.value.field == "image"


@pytest.mark.parametrize("value", ["hello", ["a"] * 64, "1.0"])
def test_as_row_rejects_text(value: object) -> None:
    with pytest.raises(InputError, match="text") as info:
        as_row(IMAGE, value, row=3)
    assert "row 3" in str(info.value) and info.value.field == "image"


@pytest.mark.parametrize("value", [[[1, 2], [3]], None, {"a": 1}],
                         ids=["ragged", "none", "dict"])
def test_as_row_rejects_non_numeric_values(value: object) -> None:
    with pytest.raises(InputError) as info:
        as_row(IMAGE, value, row=2)
    assert "row 2" in str(info.value)


def test_as_row_refuses_floats_for_an_integer_field() -> None:
    with pytest.raises(InputError, match="cannot use dtype float64 as int64"):
        as_row(COUNTS, [1.5, 2.0, 3.0, 4.0], row=0)
    assert as_row(COUNTS, [1, 2, 3, 4]).dtype == np.int64


# -- check_rows ------------------------------------------------------------------------------
def _block(n: int, dtype: str = "float64") -> np.ndarray:
    return np.arange(n * 64, dtype=dtype).reshape(n, 64)


def test_check_rows_reshapes_a_clean_block() -> None:
    valid, kept, errors = check_rows(IMAGE, _block(3))
    assert valid.shape == (3, 1, 8, 8) and valid.dtype == np.float32
    np.testing.assert_array_equal(kept, [0, 1, 2])
    assert errors == []


def test_check_rows_casts_int_to_float32() -> None:
    valid, kept, errors = check_rows(IMAGE, _block(2, "int64").reshape(2, 1, 8, 8))
    assert valid.dtype == np.float32
    np.testing.assert_array_equal(valid.reshape(2, 64), _block(2))
    np.testing.assert_array_equal(kept, [0, 1])
    assert errors == []


def test_check_rows_splits_nan_and_inf_rows_into_errors() -> None:
    block = _block(5)
    block[1, 10] = np.nan
    block[3, 0] = np.inf
    block[4, 63] = -np.inf
    valid, kept, errors = check_rows(IMAGE, block, first_row=100)
    np.testing.assert_array_equal(kept, [0, 2])
    np.testing.assert_array_equal(valid.reshape(2, 64), block[[0, 2]])
    assert [e.row for e in errors] == [101, 103, 104]
    assert all(e.field == "image" for e in errors)
    assert "row 101" in errors[0].message and "NaN or infinity" in errors[0].message


def test_check_rows_names_rows_by_label_when_given() -> None:
    block = _block(4)
    block[0, 0] = np.nan
    block[2, 5] = np.inf
    labels = np.array([17, 3, 42, 9])
    _, kept, errors = check_rows(IMAGE, block, first_row=1000, labels=labels)
    np.testing.assert_array_equal(kept, [1, 3])
    assert [e.row for e in errors] == [17, 42]
    assert "row 42" in errors[1].message


def test_check_rows_all_bad_leaves_nothing() -> None:
    block = np.full((2, 64), np.nan)
    valid, kept, errors = check_rows(IMAGE, block)
    assert valid.shape == (0, 1, 8, 8) and len(kept) == 0
    assert [e.row for e in errors] == [0, 1]


@pytest.mark.parametrize("shape", [(3, 63), (3, 8, 9), (3,), (3, 65)])
def test_check_rows_refuses_a_wrong_row_shape_whole(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match="'image'") as info:
        check_rows(IMAGE, np.zeros(shape))
    assert info.value.field == "image"
    assert "(1, 8, 8)" in str(info.value)


@pytest.mark.parametrize("arr", [np.float32(1.0), np.array(["a"] * 64).reshape(1, 64)],
                         ids=["scalar", "text"])
def test_check_rows_refuses_scalars_and_text(arr: np.ndarray) -> None:
    with pytest.raises(InputError) as info:
        check_rows(IMAGE, np.asarray(arr))
    assert info.value.field == "image"


def test_check_rows_refuses_floats_for_an_integer_field() -> None:
    with pytest.raises(InputError, match="'counts'"):
        check_rows(COUNTS, np.zeros((2, 4)))
    valid, _, errors = check_rows(COUNTS, np.ones((2, 4), np.int32))
    assert valid.dtype == np.int64 and errors == []
