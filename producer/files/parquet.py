"""Reading .parquet inputs: one list column, or one numeric column per value."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from producer.bulk.chunks import Chunk
from producer.files.rows import BLOCK_BYTES, assemble, empty_chunk, loose, row_error, row_width
from shared.errors import InputError
from shared.schemas import RowError, TensorSpec
from shared.validation import as_row


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t)
                or pa.types.is_fixed_size_list(t))


def _is_numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))


def _parquet_layout(path: Path, schema: pa.Schema, spec: TensorSpec) -> tuple[bool, list[str]]:
    """(True, [list column]) or (False, numeric columns making the row); refuse the rest."""
    width, names = row_width(spec), list(schema.names)
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


def parquet_chunks(path: Path, spec: TensorSpec, chunk_rows: int,
                    skip: frozenset[int]) -> Iterator[Chunk]:
    try:
        # buffered reads instead of whole column chunks: a file written as one big row
        # group (pyarrow's default up to 1Mi rows) would otherwise be read at once
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=BLOCK_BYTES)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"input file {path}: not a readable parquet file ({exc})") from None
    is_list, columns = _parquet_layout(path, pf.schema_arrow, spec)
    return _parquet_iter(path, pf, spec, chunk_rows, skip, is_list, columns)


def _parquet_iter(path: Path, pf: pq.ParquetFile, spec: TensorSpec, chunk_rows: int,
                  skip: frozenset[int], is_list: bool, columns: list[str]) -> Iterator[Chunk]:
    """The chunks; data that cannot be read (a valid footer, a corrupted middle) raises
    InputError naming the rows where reading stopped."""
    pieces = _parquet_pieces(pf, columns, chunk_rows, skip)
    read = 0
    with pf:
        try:
            for chunk in _parquet_chunks(pieces, spec, chunk_rows, skip, is_list):
                read += chunk.rows
                yield chunk
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"input file {path}: the data after row {read} cannot be read "
                             f"(corrupted or truncated parquet: {exc})") from None


def _parquet_chunks(pieces: Iterator[pa.RecordBatch | int], spec: TensorSpec,
                    chunk_rows: int, skip: frozenset[int], is_list: bool) -> Iterator[Chunk]:
    for index, (rows, parts) in enumerate(_rechunk(pieces, chunk_rows)):
        start = index * chunk_rows
        if index in skip:
            yield empty_chunk(spec, index, start, rows)
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
                bad.setdefault(int(i), row_error(
                    spec, start + int(i), f"column {name!r}: null value; expected a number"))
            col = col.fill_null(0)
        columns.append(col.to_numpy())
    values = np.column_stack(columns).reshape((table.num_rows, *spec.row_shape))
    return assemble(spec, index, start, values, dict(sorted(bad.items())))


def _parse_list_column(spec: TensorSpec, index: int, start: int,
                       column: pa.ChunkedArray) -> Chunk:
    """One list column -> (rows, width); null, short or long lists are row errors."""
    col = column.combine_chunks()
    if _is_list(col.type.value_type):
        return _parse_nested_lists(spec, index, start, col)
    width, rows = row_width(spec), len(col)
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy()
    ok = lengths == width
    bad = {int(i): row_error(spec, start + int(i), f"field {spec.name!r}: " + (
        "null value" if lengths[i] < 0 else f"got {lengths[i]} values")
        + f"; expected {width} (row shape {spec.row_shape})") for i in np.flatnonzero(~ok)}
    flat = (col if ok.all() else col.filter(pa.array(ok))).flatten()
    good = np.flatnonzero(ok)
    if flat.null_count:
        holes = flat.is_null().to_numpy(zero_copy_only=False).reshape(-1, width).any(axis=1)
        for i in good[holes]:
            bad[int(i)] = row_error(spec, start + int(i),
                                     f"field {spec.name!r}: null value inside the list")
        flat = flat.fill_null(0)
    dense = flat.to_numpy(zero_copy_only=False).reshape(-1, width)
    if good.size == rows:
        values = dense
    else:
        values = np.zeros((rows, width), dense.dtype)
        values[good] = dense
    return assemble(spec, index, start, values.reshape((rows, *spec.row_shape)),
                     dict(sorted(bad.items())))


def _parse_nested_lists(spec: TensorSpec, index: int, start: int, col: pa.Array) -> Chunk:
    """Lists of lists: rare, so row by row through as_row."""
    widened = loose(spec)
    values = np.zeros((len(col), *spec.row_shape), widened.np_dtype)
    bad: dict[int, RowError] = {}
    for i, value in enumerate(col.to_pylist()):
        try:
            if value is None:
                raise InputError(f"row {start + i}, field {spec.name!r}: null value")
            with np.errstate(over="ignore"):
                values[i] = as_row(widened, value, row=start + i)
        except InputError as exc:
            bad[i] = RowError(row=start + i, field=spec.name, message=str(exc))
    return assemble(spec, index, start, values, bad)
