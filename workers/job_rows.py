"""A job's rows: checked against the manifest on the way in (a bad row fails alone), and
assembled into the job's stored result on the way out (outputs for every row, which rows
failed and why, timings). Both tasks use these (workers/tasks.py, workers/many.py)."""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np

from shared.errors import InputError
from shared.schemas import Manifest
from shared.validation import check_rows
from workers.batcher import Outcome
from workers.metrics import WorkerMetrics
from workers.pool import Served


def validate(manifest: Manifest, inputs: Any, first_row: int, row_ids: Any
              ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """-> (valid rows per input, their indices, the row labels, errors of the other rows).

    Rows are labelled ``first_row + i``, or by ``row_ids`` when the producer dropped
    rows (bad ones) from a block; errors carry both the label and the index in the message.
    """
    if not isinstance(inputs, dict):
        raise InputError("inputs must be a mapping of input name to array", field="inputs")
    rows: int | None = None
    labels: np.ndarray | None = None
    checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    errors: dict[int, dict[str, Any]] = {}
    for spec in manifest.inputs:
        if spec.name not in inputs:
            raise InputError(f"missing input {spec.name!r} (model {manifest.name} takes "
                             f"{[s.name for s in manifest.inputs]})", field=spec.name)
        value = inputs[spec.name]
        arr: Any = value if spec.dtype == "string" and isinstance(value, list) \
            else np.asarray(value)
        if rows is not None and len(arr) != rows:
            raise InputError(f"input {spec.name!r} has {len(arr)} rows, others {rows}",
                             field=spec.name)
        rows = len(arr) if isinstance(arr, list) or arr.ndim else 0
        if labels is None:
            labels = labels_of(row_ids, first_row, rows)
        data, kept, errs = check_rows(spec, arr, first_row, labels=labels)
        checked[spec.name] = (data, kept)
        for e in errs:
            index = int(np.flatnonzero(labels == e.row)[0])
            errors.setdefault(index, {"index": index, **e.model_dump()})
    assert rows is not None and labels is not None
    keep = np.arange(rows) if not errors else \
        np.setdiff1d(np.arange(rows), np.array(list(errors), dtype=np.int64))
    valid = {name: data if len(kept) == len(keep) else data[np.searchsorted(kept, keep)]
             for name, (data, kept) in checked.items()}
    return valid, keep, labels, list(errors.values())


def labels_of(row_ids: Any, first_row: int, rows: int) -> np.ndarray:
    if row_ids is None:
        return np.arange(first_row, first_row + rows)
    labels = np.asarray(row_ids)
    if labels.shape != (rows,) or labels.dtype.kind not in "iu":
        raise InputError(f"row_ids must be {rows} integers, got {labels.shape} "
                         f"{labels.dtype}", field="row_ids")
    return labels


def assemble(manifest: Manifest, outcome: Outcome, keep: np.ndarray, labels: np.ndarray,
              errors: list[dict[str, Any]]) -> tuple[dict, np.ndarray]:
    rows = len(labels)
    ok = np.zeros(rows, dtype=bool)
    ok[keep] = True
    outputs: dict[str, np.ndarray] = {}
    for spec in manifest.outputs:
        got = None if outcome.outputs is None else outcome.outputs[spec.name]
        if got is not None and len(keep) == rows:
            outputs[spec.name] = got
            continue
        shape = got.shape[1:] if got is not None else [max(d, 1) for d in spec.row_shape]
        full = np.zeros((rows, *shape), got.dtype if got is not None else spec.np_dtype)
        if got is not None:
            full[keep] = got
        outputs[spec.name] = full
    for i, message in outcome.errors.items():
        index = int(keep[i])
        ok[index] = False
        row = int(labels[index])
        errors.append({"index": index, "row": row, "field": None,
                       "message": f"row {row}: {message}"})
    return outputs, ok


def truncated_rows(outcome: Outcome, keep: np.ndarray, labels: np.ndarray) -> list[int]:
    """Rows the runtime cut to the model's length limit (text), by row label."""
    flags = None if outcome.outputs is None else outcome.outputs.get("_truncated")
    if flags is None:
        return []
    return [int(labels[keep[i]]) for i in np.flatnonzero(flags)]


def finish(served: Served, outcome: Outcome, keep: np.ndarray, labels: np.ndarray,
           errors: list[dict[str, Any]], submitted_at: float | None, started: float,
           worker: str | None, metrics: WorkerMetrics | None = None) -> dict[str, Any]:
    """A job's stored result: outputs for every row, which rows failed and why, timings."""
    manifest = served.version.manifest
    outputs, ok = assemble(manifest, outcome, keep, labels, errors)
    if metrics is not None:
        state = "succeeded" if ok.all() else "failed" if not ok.any() else "partial"
        metrics.job(manifest.name, state, submitted_at, started)
    return {
        "model": manifest.name, "version": manifest.version,
        "variant": manifest.variant, "rows": len(labels),
        "outputs": outputs, "ok": ok,
        "errors": sorted(errors, key=lambda e: e["index"]),
        "batch_rows": outcome.batch_rows, "submitted_at": submitted_at,
        "truncated": truncated_rows(outcome, keep, labels),
        "started_at": started, "finished_at": time.time(),
        "worker": worker or socket.gethostname(),
    }
