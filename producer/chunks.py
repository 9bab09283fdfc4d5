"""A block of input rows on its way to a worker, and what came back for it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from shared.schemas import RowError, TensorSpec
from shared.validation import check_rows


@dataclass
class Chunk:
    index: int  # chunk number 0, 1, 2, ...
    start: int  # input row number of the chunk's first row
    rows: int  # input rows covered, valid and invalid
    data: np.ndarray  # the valid rows only
    keep: np.ndarray  # indices (0..rows-1) of the valid rows, in order
    errors: list[RowError] = field(default_factory=list)


def array_chunks(spec: TensorSpec, arr: np.ndarray, chunk_rows: int) -> Iterator[Chunk]:
    """Slice an in-memory array into validated chunks (bad rows become errors)."""
    for index, start in enumerate(range(0, len(arr), chunk_rows)):
        block = arr[start:start + chunk_rows]
        data, keep, errors = check_rows(spec, block, start)
        yield Chunk(index, start, len(block), data, keep, errors)


@dataclass
class ChunkResult:
    """One chunk's rows in input order: outputs (zeros where a row failed), ok, errors."""

    index: int
    start: int
    rows: int
    outputs: dict[str, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]  # absolute input row -> message
    truncated: list[int] = field(default_factory=list)  # rows cut to the model's limit


def empty_outputs(specs: list[TensorSpec], rows: int) -> dict[str, np.ndarray]:
    return {s.name: np.zeros((rows, *[max(d, 1) for d in s.row_shape]), s.np_dtype)
            for s in specs}


def merge(chunk: Chunk, specs: list[TensorSpec], value: object) -> ChunkResult:
    """Spread a task's result (valid rows only) back over all the chunk's input rows."""
    errors = {e.row: e.message for e in chunk.errors}
    ok = np.zeros(chunk.rows, dtype=bool)
    outputs = empty_outputs(specs, chunk.rows)
    keep = chunk.keep
    if isinstance(value, BaseException) or (len(keep) and not isinstance(value, dict)):
        message = f"{type(value).__name__}: {value}"
        for i in keep:
            errors[chunk.start + int(i)] = message
    elif len(keep):
        assert isinstance(value, dict)
        for name, got in value["outputs"].items():
            if name in outputs and len(keep) == chunk.rows:
                outputs[name] = got
            elif name in outputs:
                outputs[name] = np.zeros((chunk.rows, *got.shape[1:]), got.dtype)
                outputs[name][keep] = got
        ok[keep] = value["ok"]
        for e in value["errors"]:
            errors[chunk.start + int(keep[e["index"]])] = e["message"]
        truncated = [int(r) for r in value.get("truncated", [])]
        return ChunkResult(chunk.index, chunk.start, chunk.rows, outputs, ok, errors, truncated)
    return ChunkResult(chunk.index, chunk.start, chunk.rows, outputs, ok, errors)
