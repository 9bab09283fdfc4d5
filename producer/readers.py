"""Stream an input file as chunks of validated rows, so a million-row file never sits in memory.

Every format yields the same thing: a :class:`Chunk` of ``chunk_rows`` consecutive input rows
(the last may be shorter), the valid rows parsed into one array and each invalid row as a
:class:`RowError` that names the row, the column and what was expected. One bad row never
sinks its chunk; only problems of the whole file (wrong row shape in a .npy, unusable
parquet columns, a CSV header of the wrong width) raise :class:`InputError`, up front.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from producer.chunks import Chunk  # one Chunk type for files and in-memory arrays
from shared.errors import InputError
from shared.schemas import RowError, TensorSpec
from shared.validation import as_row, check_rows

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "Chunk", "count_rows", "read_chunks"]

SUPPORTED = (".npy", ".csv", ".jsonl", ".parquet")
_BLOCK_BYTES = 1 << 20


# ---------------------------------------------------------------------------- public API


def count_rows(path: Path) -> int | None:
    """Rows in ``path`` without parsing them (for a progress bar); None when not cheap."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return int(arr.shape[0]) if arr.ndim else None
        if suffix == ".parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)
        if suffix in (".csv", ".jsonl"):
            lines = _count_nonblank_lines(path)
            if suffix == ".csv" and _first_line_cells(path) is not None:
                lines -= 1  # the header
            return lines
    except (OSError, ValueError, pa.ArrowException) as exc:
        logger.debug("cannot count rows of %s: %s", path, exc)
    return None


def read_chunks(path: Path, spec: TensorSpec, chunk_rows: int, *,
                skip_chunks: frozenset[int] = frozenset()) -> Iterator[Chunk]:
    """Chunks of ``chunk_rows`` input rows checked against ``spec``, in file order.

    Chunks in ``skip_chunks`` (already done, on resume) keep their index/start/rows but may
    come back without data; boundaries never depend on ``skip_chunks``. File-level problems
    raise InputError here, before the first chunk.
    """
    path = Path(path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise InputError(f"input file {path}: unsupported extension {suffix or '(none)'!r}; "
                         f"use one of {', '.join(SUPPORTED)}")
    _width(spec)
    logger.debug("reading %s in chunks of %d rows for input %r", path, chunk_rows, spec.name)
    return _READERS[suffix](path, spec, chunk_rows, frozenset(skip_chunks))


# ---------------------------------------------------------------------------- shared helpers


def _width(spec: TensorSpec) -> int:
    """Values per row; files can only feed numeric inputs of a fixed row shape."""
    if spec.dtype == "string" or -1 in spec.row_shape:
        raise InputError(f"input {spec.name!r}: files can feed only numeric inputs with a fixed "
                         f"row shape, got dtype {spec.dtype} and shape {spec.shape}",
                         field=spec.name)
    return int(np.prod(spec.row_shape, dtype=np.int64))


def _parse_dtype(spec: TensorSpec) -> np.dtype[Any]:
    """Text is parsed straight into the spec's dtype (bools as integers, then != 0)."""
    return np.dtype(np.int64) if spec.dtype == "bool" else spec.np_dtype


def _empty(spec: TensorSpec, index: int, start: int, rows: int) -> Chunk:
    return Chunk(index, start, rows, np.empty((0, *spec.row_shape), spec.np_dtype),
                 np.empty(0, np.int64), [])


def _assemble(spec: TensorSpec, index: int, start: int, values: np.ndarray,
              bad: dict[int, RowError]) -> Chunk:
    """Run check_rows on a parsed block; rows in ``bad`` (offsets) hold placeholders and go."""
    if spec.dtype == "bool" and values.dtype.kind != "b":
        values = values != 0
    values = _fit_ints(spec, start, values, bad)
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


def _fit_ints(spec: TensorSpec, start: int, values: np.ndarray,
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
        bad.setdefault(int(i), _row_error(spec, start + int(i), problem))
    if out.any():
        flat = np.where(out[:, None], 0, flat)
    return flat.astype(target).reshape(values.shape)


def _loose(spec: TensorSpec) -> TensorSpec:
    """The spec with integers (and bools) widened to int64, for as_row; _fit_ints narrows."""
    return spec.model_copy(update={"dtype": "int64"}) if spec.np_dtype.kind in "biu" else spec


def _row_error(spec: TensorSpec, row: int, message: str) -> RowError:
    return RowError(row=row, field=spec.name, message=f"row {row}, {message}")


def _show(value: str, limit: int = 40) -> str:
    value = value.strip()
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _open_text(path: Path) -> TextIO:
    # undecodable bytes become U+FFFD, so they show up as a bad value of one row
    return path.open("r", encoding="utf-8", errors="replace", newline=None)


def _line_blocks(path: Path, chunk_rows: int, skip_first: bool) -> Iterator[list[str]]:
    """Non-blank lines in lists of ``chunk_rows``; blank lines are not rows."""
    with _open_text(path) as f:
        lines = (line for line in f if line.strip())
        if skip_first:
            next(lines, None)
        while block := list(islice(lines, chunk_rows)):
            yield block


def _count_nonblank_lines(path: Path) -> int:
    """Lines holding something other than whitespace, counted in binary blocks."""
    total, pending = 0, False  # pending: the unterminated line so far has content
    with path.open("rb") as f:
        while block := f.read(_BLOCK_BYTES):
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


# ---------------------------------------------------------------------------- .npy


def _npy_chunks(path: Path, spec: TensorSpec, chunk_rows: int,
                skip: frozenset[int]) -> Iterator[Chunk]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"input file {path}: not a readable .npy array ({exc})") from None
    width = _width(spec)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"input file {path}: expected numbers (dtype {spec.dtype}), "
                         f"got dtype {arr.dtype}", field=spec.name)
    if arr.ndim == 0 or int(np.prod(arr.shape[1:], dtype=np.int64)) != width:
        dims = ", ".join(map(str, spec.row_shape))
        raise InputError(f"input file {path}: expected an array of shape (N, {dims}) or "
                         f"(N, {width}) for input {spec.name!r}, got shape {arr.shape}",
                         field=spec.name)
    return _npy_iter(arr, spec, chunk_rows, skip)


def _npy_iter(arr: np.ndarray, spec: TensorSpec, chunk_rows: int,
              skip: frozenset[int]) -> Iterator[Chunk]:
    total = arr.shape[0]
    for index, start in enumerate(range(0, total, chunk_rows)):
        rows = min(chunk_rows, total - start)
        if index in skip:
            yield _empty(spec, index, start, rows)
            continue
        block = np.array(arr[start:start + rows])  # a real copy, not a view of the mmap
        yield _assemble(spec, index, start, block.reshape((rows, *spec.row_shape)), {})


# ---------------------------------------------------------------------------- .csv


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _first_line_cells(path: Path) -> list[str] | None:
    """The header's column names, or None when the first line is data.

    A header is a first line where most cells are not numbers; a data row with one bad cell
    stays a data row, so its error is reported instead of it vanishing as a "header".
    """
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                cells = [c.strip().strip('"') for c in line.split(",")]
                non_numeric = sum(not _is_number(c) for c in cells)
                return cells if non_numeric * 2 > len(cells) else None
    return None


def _csv_chunks(path: Path, spec: TensorSpec, chunk_rows: int,
                skip: frozenset[int]) -> Iterator[Chunk]:
    width = _width(spec)
    header = _first_line_cells(path)
    if header is not None and len(header) != width:
        raise InputError(f"input file {path}: header has {len(header)} columns, expected "
                         f"{width} (input {spec.name!r} of row shape {spec.row_shape})",
                         field=spec.name)
    return _csv_iter(path, spec, chunk_rows, skip, header)


def _csv_iter(path: Path, spec: TensorSpec, chunk_rows: int, skip: frozenset[int],
              header: list[str] | None) -> Iterator[Chunk]:
    start = 0
    blocks = _line_blocks(path, chunk_rows, skip_first=header is not None)
    for index, lines in enumerate(blocks):
        if index in skip:
            yield _empty(spec, index, start, len(lines))
        else:
            yield _parse_csv(spec, index, start, lines, header)
        start += len(lines)


def _parse_csv(spec: TensorSpec, index: int, start: int, lines: list[str],
               header: list[str] | None) -> Chunk:
    """Whole chunk through numpy's C parser; row by row only when that refuses it."""
    width, dtype = _width(spec), _parse_dtype(spec)
    bad: dict[int, RowError] = {}
    try:
        values = np.loadtxt(lines, delimiter=",", dtype=dtype, comments=None, ndmin=2)
        if values.shape != (len(lines), width):
            raise ValueError("ragged rows")
    except ValueError:
        values = np.zeros((len(lines), width), dtype)
        for i, line in enumerate(lines):
            problem = _csv_row(values[i], line, spec, header)
            if problem:
                bad[i] = _row_error(spec, start + i, problem)
    return _assemble(spec, index, start, values.reshape((len(lines), *spec.row_shape)), bad)


def _csv_row(out: np.ndarray, line: str, spec: TensorSpec, header: list[str] | None) -> str:
    """Parse one line into ``out``; the problem (column, value, expectation) or ''."""
    cells = line.rstrip("\r\n").split(",")
    if len(cells) != out.size:
        return (f"field {spec.name!r}: expected {out.size} comma-separated values "
                f"(row shape {spec.row_shape}), got {len(cells)}")
    whole = out.dtype.kind in "iu"
    convert: Callable[[str], Any] = int if whole else float
    for j, cell in enumerate(cells):
        try:
            with np.errstate(over="ignore"):
                out[j] = convert(cell)
        except (ValueError, OverflowError):
            column = f"column {header[j]!r} (index {j})" if header else f"column {j}"
            kind = "an integer in range" if whole else "a number"
            return f"{column}: {_show(cell)} is not {kind}; expected {spec.dtype} values"
    return ""


# ---------------------------------------------------------------------------- .jsonl


def _jsonl_chunks(path: Path, spec: TensorSpec, chunk_rows: int,
                  skip: frozenset[int]) -> Iterator[Chunk]:
    start = 0
    for index, lines in enumerate(_line_blocks(path, chunk_rows, skip_first=False)):
        if index in skip:
            yield _empty(spec, index, start, len(lines))
        else:
            yield _parse_jsonl(spec, index, start, lines)
        start += len(lines)


def _json_value(spec: TensorSpec, line: str) -> Any:
    """The row's value from one line: a list, or an object's ``spec.name``/"input" key."""
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc}); expected a JSON list of {_width(spec)} "
                         f"numbers or an object with key {spec.name!r}") from None
    if isinstance(value, dict):
        for key in (spec.name, "input"):
            if key in value:
                return value[key]
        raise ValueError(f"object has no key {spec.name!r} or 'input' "
                         f"(keys: {', '.join(map(repr, list(value)[:8]))})")
    return value


def _parse_jsonl(spec: TensorSpec, index: int, start: int, lines: list[str]) -> Chunk:
    """Decode each line, then try the block as one array; per row only when that fails."""
    bad: dict[int, RowError] = {}
    found: dict[int, Any] = {}
    for i, line in enumerate(lines):
        try:
            found[i] = _json_value(spec, line)
        except ValueError as exc:
            bad[i] = _row_error(spec, start + i, f"field {spec.name!r}: {exc}")
    loose = _loose(spec)
    values = np.zeros((len(lines), *spec.row_shape), loose.np_dtype)
    block = _json_block(loose, list(found.values()))
    with np.errstate(over="ignore"):  # float overflow -> inf -> a row error
        if block is not None:
            values[list(found)] = block.reshape((len(found), *spec.row_shape))
        else:
            for i, value in found.items():
                try:
                    values[i] = as_row(loose, value, row=start + i)
                except InputError as exc:
                    bad[i] = RowError(row=start + i, field=spec.name, message=str(exc))
    return _assemble(spec, index, start, values, bad)


def _json_block(spec: TensorSpec, found: list[Any]) -> np.ndarray | None:
    """All decoded rows as one (n, width) array, or None when any row is off."""
    if not found:
        return None
    try:
        arr = np.asarray(found)
    except (ValueError, TypeError):
        return None
    target = spec.np_dtype
    if arr.dtype.kind not in "biuf" or not (
            np.can_cast(arr.dtype, target, "same_kind") or target.kind == "f"):
        return None  # as_row, row by row, says which rows cannot be cast
    if arr.ndim < 1 or int(np.prod(arr.shape[1:], dtype=np.int64)) != _width(spec):
        return None
    return arr.reshape(len(found), -1)


# ---------------------------------------------------------------------------- .parquet


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t)
                or pa.types.is_fixed_size_list(t))


def _is_numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))


def _parquet_layout(path: Path, schema: pa.Schema, spec: TensorSpec) -> tuple[bool, list[str]]:
    """(True, [list column]) or (False, numeric columns making the row); refuse the rest."""
    width, names = _width(spec), list(schema.names)
    for name in (spec.name, *names[:1]):
        if name in names and _is_list(schema.field(name).type) and (
                name == spec.name or len(names) == 1):
            leaf = schema.field(name).type
            while _is_list(leaf):
                leaf = leaf.value_type
            if _is_numeric(leaf):
                return True, [name]
    if len(names) == width and all(_is_numeric(schema.field(n).type) for n in names):
        return False, names
    shown = ", ".join(f"{n}: {schema.field(n).type}" for n in names[:6])
    more = f", ... ({len(names)} columns)" if len(names) > 6 else ""
    raise InputError(f"input file {path}: expected one numeric list column named {spec.name!r} "
                     f"(or a file with a single list column), or {width} numeric columns "
                     f"making each row; got {shown}{more}", field=spec.name)


def _parquet_chunks(path: Path, spec: TensorSpec, chunk_rows: int,
                    skip: frozenset[int]) -> Iterator[Chunk]:
    try:
        # buffered reads instead of whole column chunks: a file written as one big row
        # group (pyarrow's default up to 1Mi rows) would otherwise be read at once
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=_BLOCK_BYTES)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"input file {path}: not a readable parquet file ({exc})") from None
    is_list, columns = _parquet_layout(path, pf.schema_arrow, spec)
    return _parquet_iter(pf, spec, chunk_rows, skip, is_list, columns)


def _parquet_iter(pf: pq.ParquetFile, spec: TensorSpec, chunk_rows: int,
                  skip: frozenset[int], is_list: bool, columns: list[str]) -> Iterator[Chunk]:
    pieces = _parquet_pieces(pf, columns, chunk_rows, skip)
    with pf:
        for index, (rows, parts) in enumerate(_rechunk(pieces, chunk_rows)):
            start = index * chunk_rows
            if index in skip:
                yield _empty(spec, index, start, rows)
                continue
            table = pa.Table.from_batches([p for p in parts if not isinstance(p, int)])
            if is_list:
                yield _parse_list_column(spec, index, start, table.column(0))
            else:
                yield _parse_columns(spec, index, start, table)


def _parquet_pieces(pf: pq.ParquetFile, columns: list[str], chunk_rows: int,
                    skip: frozenset[int]) -> Iterator[pa.RecordBatch | int]:
    """Record batches in file order; a row group no wanted chunk touches is just its size."""
    meta, first = pf.metadata, 0
    wanted: list[int] = []
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        touched = range(first // chunk_rows, (first + n - 1) // chunk_rows + 1)
        if n and all(c in skip for c in touched):
            if wanted:
                yield from pf.iter_batches(chunk_rows, row_groups=wanted, columns=columns)
                wanted = []
            yield n
        elif n:
            wanted.append(rg)
        first += n
    if wanted:
        yield from pf.iter_batches(chunk_rows, row_groups=wanted, columns=columns)


def _rechunk(pieces: Iterator[pa.RecordBatch | int], chunk_rows: int
             ) -> Iterator[tuple[int, list[pa.RecordBatch | int]]]:
    """Cut batches (or skipped row counts) into runs of exactly ``chunk_rows`` rows."""
    parts: list[pa.RecordBatch | int] = []
    have = 0
    for piece in pieces:
        size = piece if isinstance(piece, int) else piece.num_rows
        while size:
            take = min(size, chunk_rows - have)
            if isinstance(piece, int):
                head, piece = take, piece - take
            else:
                head, piece = piece.slice(0, take), piece.slice(take)
            parts.append(head)
            have, size = have + take, size - take
            if have == chunk_rows:
                yield have, parts
                parts, have = [], 0
    if have:
        yield have, parts


def _parse_columns(spec: TensorSpec, index: int, start: int, table: pa.Table) -> Chunk:
    """N numeric columns -> (rows, N); a null cell is its row's error."""
    bad: dict[int, RowError] = {}
    columns = []
    for name, col in zip(table.column_names, table.columns, strict=True):
        if col.null_count:
            for i in np.flatnonzero(col.is_null().to_numpy()):
                bad.setdefault(int(i), _row_error(
                    spec, start + int(i), f"column {name!r}: null value; expected a number"))
            col = col.fill_null(0)
        columns.append(col.to_numpy())
    values = np.column_stack(columns).reshape((table.num_rows, *spec.row_shape))
    return _assemble(spec, index, start, values, dict(sorted(bad.items())))


def _parse_list_column(spec: TensorSpec, index: int, start: int,
                       column: pa.ChunkedArray) -> Chunk:
    """One list column -> (rows, width); null, short or long lists are row errors."""
    col = column.combine_chunks()
    if _is_list(col.type.value_type):
        return _parse_nested_lists(spec, index, start, col)
    width, rows = _width(spec), len(col)
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy()
    ok = lengths == width
    bad = {int(i): _row_error(spec, start + int(i), f"field {spec.name!r}: " + (
        "null value" if lengths[i] < 0 else f"got {lengths[i]} values")
        + f"; expected {width} (row shape {spec.row_shape})") for i in np.flatnonzero(~ok)}
    flat = (col if ok.all() else col.filter(pa.array(ok))).flatten()
    good = np.flatnonzero(ok)
    if flat.null_count:
        holes = flat.is_null().to_numpy(zero_copy_only=False).reshape(-1, width).any(axis=1)
        for i in good[holes]:
            bad[int(i)] = _row_error(spec, start + int(i),
                                     f"field {spec.name!r}: null value inside the list")
        flat = flat.fill_null(0)
    dense = flat.to_numpy(zero_copy_only=False).reshape(-1, width)
    if good.size == rows:
        values = dense
    else:
        values = np.zeros((rows, width), dense.dtype)
        values[good] = dense
    return _assemble(spec, index, start, values.reshape((rows, *spec.row_shape)),
                     dict(sorted(bad.items())))


def _parse_nested_lists(spec: TensorSpec, index: int, start: int, col: pa.Array) -> Chunk:
    """Lists of lists: rare, so row by row through as_row."""
    loose = _loose(spec)
    values = np.zeros((len(col), *spec.row_shape), loose.np_dtype)
    bad: dict[int, RowError] = {}
    for i, value in enumerate(col.to_pylist()):
        try:
            if value is None:
                raise InputError(f"row {start + i}, field {spec.name!r}: null value")
            with np.errstate(over="ignore"):
                values[i] = as_row(loose, value, row=start + i)
        except InputError as exc:
            bad[i] = RowError(row=start + i, field=spec.name, message=str(exc))
    return _assemble(spec, index, start, values, bad)


_READERS: dict[str, Callable[[Path, TensorSpec, int, frozenset[int]], Iterator[Chunk]]] = {
    ".npy": _npy_chunks,
    ".csv": _csv_chunks,
    ".jsonl": _jsonl_chunks,
    ".parquet": _parquet_chunks,
}
