"""``inferq score``: a file of rows in, one output row per input row out, in order.

State for ``--resume`` sits beside the output (``<output>.inferq.json``): the batch id
and a fingerprint of the input. A resumed run re-reads the input, takes finished chunks
from the result store and sends only the rest.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.bulk.batch import Pipeline, finished_chunks
from producer.bulk.chunks import ChunkResult, chunk_budget, chunk_rows_for
from producer.client import Client
from producer.files.readers import count_rows, read_chunks
from producer.files.writers import open_writer
from shared.errors import InputError
from shared.schemas import TensorSpec

logger = logging.getLogger(__name__)

TRUNCATED = TensorSpec(name="truncated", dtype="bool", shape=[-1],
                       description="the text was longer than the model's max_length and cut")


@dataclass
class ScoreReport:
    rows: int
    failed: int
    seconds: float
    sent_chunks: int
    reused_chunks: int
    output: Path
    batch_id: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".inferq.json")


def _fingerprint(model: str, source: Path, chunk_rows: int) -> dict[str, object]:
    st = source.stat()
    return {"model": model, "input": str(source.resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "chunk_rows": chunk_rows}


def _batch_id(model: str, source: Path, output: Path, chunk_rows: int, resume: bool) -> str:
    state = state_path(output)
    fingerprint = _fingerprint(model, source, chunk_rows)
    if resume and state.exists():
        saved = json.loads(state.read_text())
        changed = [k for k, v in fingerprint.items() if saved.get(k) != v]
        if changed:
            raise InputError(f"cannot resume: {', '.join(changed)} changed since the "
                             f"interrupted run (state in {state}); rerun without --resume")
        return str(saved["batch_id"])
    if resume:
        logger.warning("no interrupted run recorded at %s; starting afresh", state)
    batch_id = uuid.uuid4().hex
    state.write_text(json.dumps({"batch_id": batch_id, **fingerprint}, indent=2))
    return batch_id


def score_file(client: Client, model: str, source: Path, output: Path, *,
               chunk_rows: int | None = None, resume: bool = False,
               stall_timeout: float | None = None,
               on_start: Callable[[int | None], None] | None = None,
               on_chunk: Callable[[ChunkResult], None] | None = None) -> ScoreReport:
    if not source.exists():
        raise InputError(f"input file {source} does not exist")
    pipeline = Pipeline(client, model, "", stall_timeout=stall_timeout)
    manifest = pipeline.version.manifest
    chunk_rows = chunk_rows_for(manifest, chunk_rows or client.settings.chunk_rows,
                                budget=chunk_budget(client.settings))
    pipeline.batch_id = _batch_id(model, source, output, chunk_rows, resume)
    total = count_rows(source)
    if total == 0:
        raise InputError(f"input file {source.name}: no rows to score (an empty file, or "
                         "a header only); nothing was written")
    done: set[int] = set()
    if resume and total:
        done = finished_chunks(client, pipeline.batch_id, math.ceil(total / chunk_rows))
    if on_start:
        on_start(total)
    started = time.perf_counter()
    rows = failed = 0
    text = manifest.preprocessing.kind == "text"
    specs = [*manifest.outputs, TRUNCATED] if text else manifest.outputs
    writer = open_writer(output, specs)
    for part in pipeline.run(read_chunks(source, manifest.input(), chunk_rows), done):
        outputs = part.outputs
        if text:  # say which rows were cut to the model's length limit
            cut = np.zeros(part.rows, dtype=bool)
            cut[np.asarray(part.truncated, dtype=np.int64) - part.start] = True
            outputs = {**outputs, TRUNCATED.name: cut}
        writer.write(part.start, outputs, part.ok, part.errors)
        rows += part.rows
        failed += len(part.errors)
        if on_chunk:
            on_chunk(part)
    writer.close()
    state_path(output).unlink(missing_ok=True)
    if rows == 0:  # a format whose rows are only counted by reading them
        output.unlink(missing_ok=True)
        raise InputError(f"input file {source.name}: no rows to score (an empty file, or "
                         "a header only); nothing was written")
    return ScoreReport(rows, failed, time.perf_counter() - started, pipeline.sent,
                       pipeline.reused, output, pipeline.batch_id)
