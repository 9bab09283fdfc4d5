"""What every input reader shares: row width, dtype handling, row errors, line blocks."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from producer.bulk.chunks import Chunk
from shared.errors import InputError
from shared.schemas import RowError, TensorSpec
from shared.validation import check_rows

BLOCK_BYTES = 1 << 20

def row_width(spec: TensorSpec) -> int:
    """Values per row; files can only feed numeric inputs of a fixed row shape."""
    if spec.dtype == "string" or -1 in spec.row_shape:
        raise InputError(f"input {spec.name!r}: files can feed only numeric inputs with a fixed "
                         f"row shape, got dtype {spec.dtype} and shape {spec.shape}",
                         field=spec.name)
    return int(np.prod(spec.row_shape, dtype=np.int64))


def parse_dtype(spec: TensorSpec) -> np.dtype[Any]:
    """Text is parsed straight into the spec's dtype (bools as integers, then != 0)."""
    return np.dtype(np.int64) if spec.dtype == "bool" else spec.np_dtype


def empty_chunk(spec: TensorSpec, index: int, start: int, rows: int) -> Chunk:
    return Chunk(index, start, rows, np.empty((0, *spec.row_shape), spec.np_dtype),
                 np.empty(0, np.int64), [])


def assemble(spec: TensorSpec, index: int, start: int, values: np.ndarray,
              bad: dict[int, RowError]) -> Chunk:
    """Run check_rows on a parsed block; rows in ``bad`` (offsets) hold placeholders and go."""
    if spec.dtype == "bool" and values.dtype.kind != "b":
        values = values != 0
    values = fit_ints(spec, start, values, bad)
    rows = values.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf -> a row error
        data, keep, errors = check_rows(spec, values, first_row=start)
    keep = keep.astype(np.int64, copy=False)
    if bad:
        sel = ~np.isin(keep, np.fromiter(bad, np.int64, len(bad)))
        data, keep = data[sel], keep[sel]
        errors = [e for e in errors if e.row - start not in bad] + list(bad.values())
        errors.sort(key=lambda e: e.row)
    return Chunk(index, start, rows, np.ascontiguousarray(data), keep, errors)


def fit_ints(spec: TensorSpec, start: int, values: np.ndarray,
              bad: dict[int, RowError]) -> np.ndarray:
    """Integers into a narrower integer dtype, rows out of its range becoming errors.

    check_rows refuses int64 -> uint8 outright; int64 is what JSON and most parquet
    writers give for small integers, so the range is checked here, per row.
    """
    target = spec.np_dtype
    if values.dtype == target or values.dtype.kind not in "iu" or target.kind not in "iu":
        return values
    info = np.iinfo(target)
    flat = values.reshape(values.shape[0], -1)
    out = np.asarray(((flat < info.min) | (flat > info.max)).any(axis=1))
    problem = f"field {spec.name!r}: value out of range for {spec.dtype} [{info.min}, {info.max}]"
    for i in np.flatnonzero(out):
        bad.setdefault(int(i), row_error(spec, start + int(i), problem))
    if out.any():
        flat = np.where(out[:, None], 0, flat)
    return flat.astype(target).reshape(values.shape)


def loose(spec: TensorSpec) -> TensorSpec:
    """The spec with integers (and bools) widened to int64, for as_row; fit_ints narrows."""
    return spec.model_copy(update={"dtype": "int64"}) if spec.np_dtype.kind in "biu" else spec


def row_error(spec: TensorSpec, row: int, message: str) -> RowError:
    return RowError(row=row, field=spec.name, message=f"row {row}, {message}")


def show(value: str, limit: int = 40) -> str:
    value = value.strip()
    return repr(value if len(value) <= limit else value[:limit] + "...")


def open_text(path: Path) -> TextIO:
    # undecodable bytes become U+FFFD, so they show up as a bad value of one row
    return path.open("r", encoding="utf-8", errors="replace", newline=None)


def line_blocks(path: Path, chunk_rows: int, skip_first: bool) -> Iterator[list[str]]:
    """Non-blank lines in lists of ``chunk_rows``; blank lines are not rows."""
    with open_text(path) as f:
        lines = (line for line in f if line.strip())
        if skip_first:
            next(lines, None)
        while block := list(islice(lines, chunk_rows)):
            yield block


def count_nonblank_lines(path: Path) -> int:
    """Lines holding something other than whitespace, counted in binary blocks."""
    total, pending = 0, False  # pending: the unterminated line so far has content
    with path.open("rb") as f:
        while block := f.read(BLOCK_BYTES):
            buf = np.frombuffer(block, np.uint8)
            newlines = np.flatnonzero(buf == 10)
            starts = np.concatenate(([0], newlines + 1))
            starts = starts[starts < buf.size]
            # each segment runs to and includes its newline, so none is empty
            has_content = np.logical_or.reduceat(buf > 32, starts)
            has_content[0] |= pending
            total += int(np.count_nonzero(has_content[: newlines.size]))
            pending = bool(has_content[-1]) if has_content.size > newlines.size else False
    return total + int(pending)


