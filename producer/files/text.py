"""Reading text inputs (one string per row) for models whose input is ``string``.

``.txt``: each non-blank line is a row. ``.jsonl``: each line is a JSON string or an
object with the input's name (or ``text``). ``.csv``: the column named like the input
(or ``text``), else the only column; the first line is the header. ``.parquet``: such a
string column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from producer.bulk.chunks import Chunk
from producer.files.rows import line_blocks, open_text
from shared.errors import InputError
from shared.schemas import RowError, TensorSpec
from shared.validation import check_text_rows

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def read_text_chunks(path: Path, spec: TensorSpec, chunk_rows: int) -> Iterator[Chunk]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise InputError(f"input file {path}: text inputs come from "
                         f"{', '.join(TEXT_SUFFIXES)}, not {suffix or '(none)'!r}")
    blocks = {".txt": _txt_blocks, ".jsonl": _jsonl_blocks, ".csv": _csv_blocks,
              ".parquet": _parquet_blocks}[suffix](path, spec, chunk_rows)
    return _chunks(spec, blocks)


def _chunks(spec: TensorSpec, blocks: Iterator[list[Any]]) -> Iterator[Chunk]:
    start = 0
    for index, values in enumerate(blocks):
        data, keep, errors = check_text_rows(spec, values, start)
        for n, e in enumerate(errors):  # say why an unreadable row could not be read
            value = values[e.row - start]
            if isinstance(value, _Unreadable):
                errors[n] = RowError(row=e.row, field=spec.name,
                                     message=f"row {e.row}, field {spec.name!r}: {value}")
        yield Chunk(index, start, len(values), data, keep, errors)
        start += len(values)


def _column(spec: TensorSpec, names: list[str], path: Path) -> str:
    for name in (spec.name, "text"):
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise InputError(f"input file {path}: no column {spec.name!r} or 'text' among {names}")


def _txt_blocks(path: Path, spec: TensorSpec, chunk_rows: int) -> Iterator[list[Any]]:
    for lines in line_blocks(path, chunk_rows, skip_first=False):
        yield [line.rstrip("\r\n") for line in lines]


def _json_text(spec: TensorSpec, line: str) -> Any:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return _Unreadable(f"not valid JSON ({exc.msg})")
    except RecursionError:
        return _Unreadable("JSON nested too deeply")
    if isinstance(value, dict):
        for key in (spec.name, "text"):
            if key in value:
                return value[key]
        return _Unreadable(f"no key {spec.name!r} or 'text' in {sorted(value)[:5]}")
    return value


class _Unreadable:
    """A row that could not be read at all; the reason becomes its error message."""

    def __init__(self, problem: str):
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


def _jsonl_blocks(path: Path, spec: TensorSpec, chunk_rows: int) -> Iterator[list[Any]]:
    for lines in line_blocks(path, chunk_rows, skip_first=False):
        yield [_json_text(spec, line) for line in lines]


def _csv_blocks(path: Path, spec: TensorSpec, chunk_rows: int) -> Iterator[list[Any]]:
    with open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        column = header.index(_column(spec, header, path))
        rows = (r for r in reader if r)
        while block := list(islice(rows, chunk_rows)):
            yield [r[column] if column < len(r) else None for r in block]


def _parquet_blocks(path: Path, spec: TensorSpec, chunk_rows: int) -> Iterator[list[Any]]:
    pf = pq.ParquetFile(path)
    column = _column(spec, list(pf.schema_arrow.names), path)
    pending: list[Any] = []
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=[column]):
        pending.extend(batch.column(0).to_pylist())
        while len(pending) >= chunk_rows:
            yield pending[:chunk_rows]
            pending = pending[chunk_rows:]
    if pending:
        yield pending
