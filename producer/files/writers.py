"""Write ordered results: one output row per input row, with its outputs or its error.

Every writer writes to ``<path>.partial`` and renames it to ``path`` only in ``close()``, so
a crashed run never leaves a file that looks complete. Rows that failed get null outputs
(empty cells in CSV) rather than the zeros the caller holds for them, so a failed row can
never be mistaken for a prediction of class 0.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.errors import BatchContractError, InputError
from shared.schemas import TensorSpec

logger = logging.getLogger(__name__)

SUPPORTED = (".parquet", ".csv", ".jsonl")
RESERVED = ("row", "error")
ROW_GROUP_ROWS = 65_536  # small chunks are buffered so a parquet file has few row groups
FAILED = "no output for this row"


class ResultWriter(Protocol):
    def write(self, start: int, outputs: dict[str, np.ndarray], ok: np.ndarray,
              errors: dict[int, str]) -> None: ...

    def close(self) -> None: ...


def open_writer(path: Path, output_specs: list[TensorSpec]) -> ResultWriter:
    """A writer for ``path`` chosen by its extension; columns row, <outputs...>, error."""
    path = Path(path)
    suffix = path.suffix.lower()
    writers: dict[str, type[_ParquetWriter | _CsvWriter | _JsonlWriter]] = {
        ".parquet": _ParquetWriter, ".csv": _CsvWriter, ".jsonl": _JsonlWriter}
    if suffix not in writers:
        raise InputError(f"output file {path}: unsupported extension {suffix or '(none)'!r}; "
                         f"use one of {', '.join(SUPPORTED)}")
    for spec in output_specs:
        if spec.name in RESERVED:
            raise InputError(f"output {spec.name!r} clashes with the result column of that "
                             f"name; rename the output in the model manifest")
    path.parent.mkdir(parents=True, exist_ok=True)
    return writers[suffix](path, list(output_specs))


@dataclass
class _Block:
    """One write() normalised: absolute row numbers, outputs per spec, ok mask, error texts."""

    rows: np.ndarray
    outputs: dict[str, np.ndarray]  # (n,) for scalar outputs, (n, width) for the rest
    ok: np.ndarray
    errors: list[str | None]


def _width(spec: TensorSpec) -> int | None:
    """Values per row of a vector output, None for a scalar one, -1 when not fixed."""
    if not spec.row_shape:
        return None
    return -1 if -1 in spec.row_shape else int(np.prod(spec.row_shape, dtype=np.int64))


class _BaseWriter:
    """The .partial file, the ordering check and turning one write() into a _Block."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.specs = specs
        self.next_row = 0
        self.closed = False
        logger.debug("writing results to %s", self.partial)

    def _block(self, start: int, outputs: dict[str, np.ndarray], ok: np.ndarray,
               errors: dict[int, str]) -> _Block:
        if self.closed:
            raise ValueError(f"result writer for {self.path} is already closed")
        if start < self.next_row:
            raise ValueError(f"results must be written in order: rows from {self.next_row} "
                             f"expected, got a chunk starting at row {start}")
        ok = np.asarray(ok, dtype=bool).reshape(-1)
        n = ok.size
        shaped = {}
        for spec in self.specs:
            if spec.name not in outputs:
                raise BatchContractError(f"output {spec.name!r} missing from the results of "
                                         f"rows {start}..{start + n - 1}")
            arr = np.asarray(outputs[spec.name])
            if arr.ndim == 0 or arr.shape[0] != n:
                raise BatchContractError(f"output {spec.name!r} has {arr.shape[:1] or 'no'} "
                                         f"rows for a chunk of {n} rows starting at {start}")
            if spec.dtype != "string":
                arr = arr.astype(spec.np_dtype, copy=False)
            if _width(spec) is not None:
                arr = arr.reshape(n, int(np.prod(arr.shape[1:], dtype=np.int64)))
            shaped[spec.name] = arr
        rows = np.arange(start, start + n, dtype=np.int64)
        texts = [errors.get(int(r)) or (None if good else FAILED)
                 for r, good in zip(rows.tolist(), ok.tolist(), strict=True)]
        self.next_row = start + n
        return _Block(rows, shaped, ok, texts)

    def _finish(self) -> None:
        os.replace(self.partial, self.path)
        self.closed = True
        logger.debug("results complete in %s (%d rows)", self.path, self.next_row)


# ---------------------------------------------------------------------------- parquet


def _arrow_type(spec: TensorSpec) -> pa.DataType:
    value = pa.string() if spec.dtype == "string" else pa.from_numpy_dtype(spec.np_dtype)
    width = _width(spec)
    if width is None:
        return value
    return pa.list_(value) if width < 0 else pa.list_(value, width)


def _arrow_column(spec: TensorSpec, arr: np.ndarray, failed: np.ndarray,
                  kind: pa.DataType) -> pa.Array:
    mask = failed if failed.any() else None
    if _width(spec) is None:
        return pa.array(arr, type=kind, mask=mask)
    values = pa.array(arr.reshape(-1), type=kind.value_type)
    nulls = None if mask is None else pa.array(mask)
    if pa.types.is_fixed_size_list(kind):
        return pa.FixedSizeListArray.from_arrays(values, type=kind, mask=nulls)
    offsets = pa.array(np.arange(0, arr.size + 1, max(arr.shape[1], 1), dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=kind, mask=nulls)


class _ParquetWriter(_BaseWriter):
    """Buffers small chunks into row groups of about ROW_GROUP_ROWS rows."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        super().__init__(path, specs)
        self.schema = pa.schema([("row", pa.int64()),
                                 *[(s.name, _arrow_type(s)) for s in specs],
                                 ("error", pa.string())])
        self.writer = pq.ParquetWriter(self.partial, self.schema)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def write(self, start: int, outputs: dict[str, np.ndarray], ok: np.ndarray,
              errors: dict[int, str]) -> None:
        block = self._block(start, outputs, ok, errors)
        arrays = [pa.array(block.rows, pa.int64())]
        for spec in self.specs:
            kind = self.schema.field(spec.name).type
            arrays.append(_arrow_column(spec, block.outputs[spec.name], ~block.ok, kind))
        arrays.append(pa.array(block.errors, pa.string()))
        self.pending.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self.pending_rows += block.rows.size
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending)
            self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        if self.closed:
            return
        self._flush()
        self.writer.close()
        self._finish()


# ---------------------------------------------------------------------------- csv


def _texts(arr: np.ndarray, failed: np.ndarray) -> list[str]:
    """Cells of one column; numpy's shortest repr keeps float32 values short ("0.1")."""
    cells = arr.astype(str)
    if failed.any():
        cells[failed] = ""
    return list(cells.tolist())


class _CsvWriter(_BaseWriter):
    """Vector outputs become columns name_0..name_{k-1}; the header follows the first chunk."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        super().__init__(path, specs)
        self.file = self.partial.open("w", encoding="utf-8", newline="")
        self.csv = csv.writer(self.file)
        self.header_done = False

    def _header(self, widths: dict[str, int | None]) -> None:
        names = ["row"]
        for spec in self.specs:
            width = widths[spec.name]
            names += [spec.name] if width is None else [f"{spec.name}_{j}" for j in
                                                        range(max(width, 0))]
        self.csv.writerow([*names, "error"])
        self.header_done = True

    def write(self, start: int, outputs: dict[str, np.ndarray], ok: np.ndarray,
              errors: dict[int, str]) -> None:
        block = self._block(start, outputs, ok, errors)
        failed = ~block.ok
        if not self.header_done:
            self._header({s.name: None if _width(s) is None else block.outputs[s.name].shape[1]
                          for s in self.specs})
        columns = [block.rows.astype(str).tolist()]
        for spec in self.specs:
            arr = block.outputs[spec.name]
            if arr.ndim == 1:
                columns.append(_texts(arr, failed))
            else:
                columns += [_texts(arr[:, j], failed) for j in range(arr.shape[1])]
        columns.append([e or "" for e in block.errors])
        self.csv.writerows(zip(*columns, strict=True))

    def close(self) -> None:
        if self.closed:
            return
        if not self.header_done:
            self._header({s.name: _width(s) for s in self.specs})
        self.file.close()
        self._finish()


# ---------------------------------------------------------------------------- jsonl


def _json_values(arr: np.ndarray) -> list[Any]:
    """Python values per row; float32/16 go through their shortest text so 0.1 stays 0.1."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 8:
        arr = arr.astype(str).astype(np.float64)
    return list(arr.tolist())


class _JsonlWriter(_BaseWriter):
    """One JSON object per line: {"row": ..., "<output>": value or list, "error": ...}."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        super().__init__(path, specs)
        self.file = self.partial.open("w", encoding="utf-8")

    def write(self, start: int, outputs: dict[str, np.ndarray], ok: np.ndarray,
              errors: dict[int, str]) -> None:
        block = self._block(start, outputs, ok, errors)
        names = [s.name for s in self.specs]
        values = [_json_values(block.outputs[name]) for name in names]
        lines = []
        for i, (row, good) in enumerate(zip(block.rows.tolist(), block.ok.tolist(),
                                            strict=True)):
            record: dict[str, Any] = {"row": row}
            for name, column in zip(names, values, strict=True):
                record[name] = column[i] if good else None
            record["error"] = block.errors[i]
            lines.append(json.dumps(record, separators=(",", ":")))
        if lines:
            self.file.write("\n".join(lines) + "\n")

    def close(self) -> None:
        if self.closed:
            return
        self.file.close()
        self._finish()
