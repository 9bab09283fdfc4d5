"""Checking inputs against a manifest, per row, so one bad row never sinks its neighbours."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shared.errors import InputError
from shared.schemas import RowError, TensorSpec


def _describe(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("any" if d == -1 else str(d) for d in shape) + ")"


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def as_row(spec: TensorSpec, value: Any, row: int = 0) -> np.ndarray:
    """One row (list, nested list or array) -> an array of the spec's row shape and dtype."""
    if spec.dtype == "string":
        if not isinstance(value, str):
            raise InputError(f"row {row}, field {spec.name!r}: expected text, got "
                             f"{type(value).__name__}", row=row, field=spec.name)
        out = np.empty((), dtype=object)
        out[()] = value
        return out
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"row {row}, field {spec.name!r}: not a numeric array ({exc})",
                         row=row, field=spec.name) from None
    if arr.dtype.kind not in "biuf":
        raise InputError(
            f"row {row}, field {spec.name!r}: expected numbers of dtype {spec.dtype}, "
            f"got {arr.dtype.kind == 'U' and 'text' or arr.dtype}",
            row=row, field=spec.name,
        )
    want = spec.row_shape
    if -1 not in want and arr.shape != want:
        # A flat row, or the row without its size-1 axes (an 8x8 image for (1, 8, 8)).
        if arr.size == int(np.prod(want)) and (
                arr.ndim == 1 or _squeeze(arr.shape) == _squeeze(want)):
            arr = arr.reshape(want)
        else:
            raise InputError(
                f"row {row}, field {spec.name!r}: expected shape {_describe(want)} "
                f"({int(np.prod(want))} values), got shape {arr.shape}",
                row=row, field=spec.name,
            )
    return _cast(spec, arr, row)


def _cast(spec: TensorSpec, arr: np.ndarray, row: int | None) -> np.ndarray:
    target = spec.np_dtype
    if arr.dtype == target:
        return arr
    if not np.can_cast(arr.dtype, target, casting="same_kind") and not (
        arr.dtype.kind in "biu" and target.kind == "f"
    ):
        where = f"row {row}, " if row is not None else ""
        raise InputError(f"{where}field {spec.name!r}: cannot use dtype {arr.dtype} "
                         f"as {spec.dtype}", row=row, field=spec.name)
    return arr.astype(target)


MAX_TEXT_CHARS = 100_000


def check_text_rows(spec: TensorSpec, values: Any, first_row: int = 0, *,
                    labels: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[RowError]]:
    """Text rows -> (the valid strings as an object array, their indices, errors of the rest)."""
    if isinstance(values, str) or not hasattr(values, "__len__"):
        raise InputError(f"field {spec.name!r}: expected a list of strings, one per row",
                         field=spec.name)
    keep: list[int] = []
    errors: list[RowError] = []
    for i, value in enumerate(values):
        row = int(labels[i]) if labels is not None else first_row + i
        problem = None
        if not isinstance(value, str):
            problem = f"expected text, got {type(value).__name__}"
        elif not value.strip():
            problem = "empty text"
        elif len(value) > MAX_TEXT_CHARS:
            problem = f"text of {len(value):,} characters exceeds {MAX_TEXT_CHARS:,}"
        if problem:
            errors.append(RowError(row=row, field=spec.name,
                                   message=f"row {row}, field {spec.name!r}: {problem}"))
        else:
            keep.append(i)
    data = np.empty(len(keep), dtype=object)
    data[:] = [values[i] for i in keep]
    return data, np.array(keep, dtype=np.int64), errors


def check_rows(spec: TensorSpec, arr: np.ndarray, first_row: int = 0, *,
               labels: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[RowError]]:
    """A block of rows -> (valid rows, their indices within the block, errors of the rest).

    A block whose row shape is wrong is refused whole (every row has the same shape);
    rows holding NaN or infinity are refused one by one. Errors name row
    ``first_row + i``, or ``labels[i]`` when the block's rows are not consecutive.
    """
    if spec.dtype == "string":
        return check_text_rows(spec, arr, first_row, labels=labels)
    want = spec.row_shape
    if arr.ndim == 0:
        raise InputError(f"field {spec.name!r}: expected rows of shape {_describe(want)}, "
                         "got a scalar", field=spec.name)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"field {spec.name!r}: expected dtype {spec.dtype}, got {arr.dtype}",
                         field=spec.name)
    if -1 not in want and arr.shape[1:] != want:
        per_row = math.prod(arr.shape[1:])
        if per_row != math.prod(want):
            raise InputError(
                f"field {spec.name!r}: expected rows of shape {_describe(want)}, "
                f"got rows of shape {arr.shape[1:]}", field=spec.name)
        arr = arr.reshape((arr.shape[0], *want))
    arr = _cast(spec, arr, None)
    if arr.dtype.kind == "f":
        flat = arr.reshape(arr.shape[0], -1)
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            keep = np.flatnonzero(~bad)
            errors = []
            for i in np.flatnonzero(bad):
                row = int(labels[i]) if labels is not None else first_row + int(i)
                errors.append(RowError(row=row, field=spec.name, message=(
                    f"row {row}, field {spec.name!r}: contains NaN or infinity")))
            return arr[keep], keep, errors
    return arr, np.arange(arr.shape[0]), []
