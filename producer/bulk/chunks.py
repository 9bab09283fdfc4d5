"""A block of input rows on its way to a worker, and what came back for it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.errors import InputError
from shared.schemas import Manifest, RowError, TensorSpec
from shared.settings import Settings
from shared.validation import check_rows

# Bulk chunk size when INFERQ_CHUNK_ROWS is unset: about CHUNK_BYTES of decoded input per
# message, a power of two between MIN and MAX rows. Each message costs the producer and the
# worker ~2-3 ms of CPU whatever its size (Celery, kombu, claim, result, ack); at 1 MiB a
# fast model's chunk runs long enough to hide it (digits: 4,096 rows, ~14 ms of model
# time; 1,024-row chunks held bulk digits to ~0.6x of the raw model, 4,096 to ~0.8x).
# Text rows have no fixed size: TEXT_CHUNK_ROWS. docs/design.md, "Chunk size".
CHUNK_BYTES = 1 << 20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS, TEXT_CHUNK_ROWS = 16, 16_384, 1024
# Amazon SQS takes messages of at most 256 KiB, and input bytes grow by 16/9 on the way
# (kombu base64-encodes the binary body, then its SQS transport the whole JSON envelope):
# 128 KiB of input per message (228 KiB sent) leaves room for the envelope.
SQS_MESSAGE_LIMIT = 256 << 10
SQS_CHUNK_BYTES = 128 << 10


def chunk_budget(settings: Settings) -> int:
    """Input bytes per bulk message on this broker."""
    return SQS_CHUNK_BYTES if settings.broker_is_sqs else CHUNK_BYTES


def check_fits(settings: Settings, inputs: dict[str, Any], what: str = "inputs",
               fix: str = "score these rows as a bulk job, which splits them into messages "
               "that fit") -> None:
    """One message's inputs must fit it: on SQS, SQS_CHUNK_BYTES of them."""
    if not settings.broker_is_sqs:
        return
    size = payload_bytes(inputs)
    if size > SQS_CHUNK_BYTES:
        raise InputError(f"{what}: {size:,} bytes of input, over the {SQS_CHUNK_BYTES >> 10} "
                         f"KiB one Amazon SQS message carries; {fix}", field="inputs")


def payload_bytes(inputs: dict[str, Any]) -> int:
    """Input bytes as they travel: arrays' bytes, text's UTF-8 bytes."""
    return sum(_nbytes(v) for v in inputs.values())


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray) and value.dtype != object:
        return int(value.nbytes)
    if isinstance(value, np.ndarray | list | tuple):
        return sum(_nbytes(v) for v in value)
    return len(value.encode()) if isinstance(value, str) else 8


def chunk_rows_for(manifest: Manifest, configured: int | None = None, *,
                   budget: int = CHUNK_BYTES) -> int:
    """Rows per bulk message for this model: ``configured`` when given, else sized by the
    bytes of one input row to ``budget`` (``chunk_budget``; see CHUNK_BYTES)."""
    if configured:
        return configured
    # Under a message limit (SQS) the budget decides alone: no floor of 16 rows.
    least = MIN_CHUNK_ROWS if budget >= CHUNK_BYTES else 1
    if any(spec.dtype == "string" for spec in manifest.inputs):
        return max(least, TEXT_CHUNK_ROWS * budget // CHUNK_BYTES)
    row_bytes = sum(int(np.prod([max(d, 1) for d in spec.row_shape], dtype=np.int64))
                    * spec.np_dtype.itemsize for spec in manifest.inputs)
    rows = max(1, budget // max(row_bytes, 1))
    return min(MAX_CHUNK_ROWS, max(least, 1 << (rows.bit_length() - 1)))


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
