"""``/v1/batches``: many rows in (JSON, NDJSON or an uploaded file), progress, results
streamed as NDJSON in input order, cancel.

A batch is the bulk pipeline's chunks (``<batch id>-<chunk>``) plus a record of who owns
it, its size, and the rows refused before sending. Progress is counted once per finished
chunk and kept, so polling a million-row batch stays cheap.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from api.auth import Principal
from api.context import FAST_PUBLISH, Api, Who, api_of, audit, not_found
from api.schemas import BatchRequest, BatchView, CallbackInfo, Problem
from producer.bulk.batch import chunk_id, publish_chunk
from producer.bulk.chunks import Chunk, chunk_budget, chunk_rows_for, merge
from producer.files.readers import SUPPORTED, count_rows, read_chunks
from producer.publish import deadline_after
from shared import backoff, claims
from shared.results import is_final, result_value
from shared.schemas import RowError

router = APIRouter(prefix="/v1", tags=["batches"])
NDJSON = "application/x-ndjson"
_MGET = 256

BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": BatchRequest.model_json_schema()},
            NDJSON: {"schema": {"type": "string", "description":
                                "one row per line (JSON); ?model= names the model"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["model", "file"],
                "properties": {"model": {"type": "string"},
                               "callback_url": {"type": "string"},
                               "file": {"type": "string", "format": "binary",
                                        "description": "a .npy, .parquet, .csv, .jsonl "
                                        "or .txt file"}}}},
        },
    }
}


# -- submitting ------------------------------------------------------------------------------
async def _read_body(request: Request, upload_dir: Path, batch_id: str
                     ) -> tuple[str, str | None, Path]:
    """-> (model, callback_url, a file of the rows the reader understands)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload_dir.mkdir(parents=True, exist_ok=True)
    if kind == "application/json":
        try:
            body = BatchRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HTTPException(422, f"{where}: {first['msg']}") from None
        path = upload_dir / f"{batch_id}.jsonl"
        with path.open("w") as out:
            for row in body.rows:
                out.write(json.dumps(row) + "\n")
        return body.model, _url(body.callback_url), path
    if kind in (NDJSON, "application/jsonl", "application/ndjson"):
        model = request.query_params.get("model")
        if not model:
            raise HTTPException(422, "model: required as ?model= with an NDJSON body")
        path = upload_dir / f"{batch_id}.jsonl"
        with path.open("wb") as out:
            async for part in request.stream():
                out.write(part)
        return model, request.query_params.get("callback_url"), path
    if kind == "multipart/form-data":
        return await _read_form(request, upload_dir, batch_id)
    raise HTTPException(415, f"content-type {kind or '(none)'!r}: send application/json, "
                        f"{NDJSON} or multipart/form-data with a file")


async def _read_form(request: Request, upload_dir: Path, batch_id: str
                     ) -> tuple[str, str | None, Path]:
    form = await request.form()
    model, upload, url = form.get("model"), form.get("file"), form.get("callback_url")
    if not isinstance(model, str) or not model:
        raise HTTPException(422, "model: required form field")
    if upload is None or isinstance(upload, str):
        raise HTTPException(422, "file: required, an uploaded file")
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in SUPPORTED:
        raise HTTPException(422, f"file: unsupported extension {suffix or '(none)'!r}; use "
                            f"one of {', '.join(SUPPORTED)}")
    path = upload_dir / f"{batch_id}{suffix}"
    with path.open("wb") as out:
        await run_in_threadpool(shutil.copyfileobj, upload.file, out, 1 << 20)
    return model, url if isinstance(url, str) and url else None, path


def _url(value: Any) -> str | None:
    return None if value is None else str(value)


def _publish(api: Api, who: Principal, batch_id: str, model: str, callback_url: str | None,
             path: Path, route: dict[str, Any]) -> None:
    """Validate and send every chunk; on a broker failure cancel what was sent and say so.
    ``route``: the chunks' ``priority`` and ``deadline``."""
    version, ref = api.model(model)
    callback_url = api.check_callback(who, callback_url)  # every body kind, same checks
    spec = version.manifest.input()
    chunk_rows = chunk_rows_for(version.manifest, api.settings.chunk_rows,
                                budget=chunk_budget(api.settings))
    total = count_rows(path)
    cap = api.settings.api_max_batch_rows
    if total is not None and total > cap:
        raise HTTPException(413, f"rows: {total} in one batch; the limit is {cap} "
                            "(INFERQ_API_MAX_BATCH_ROWS)")
    chunks: Iterable[Chunk] = read_chunks(path, spec, chunk_rows)  # file problems: 422
    if total is None:  # not countable cheaply: read it all before admitting it
        chunks = list(chunks)
        total = sum(c.rows for c in chunks)
    ids = [chunk_id(batch_id, i) for i in range(math.ceil(total / chunk_rows))]
    _admit(api, who, ref.name, ids, chunk_rows)
    record: dict[str, Any] = {"tenant": who.tenant, "key_id": who.key_id, "model": ref.name,
                              "ref": model, "chunk_rows": chunk_rows, "created_at": time.time(),
                              "callback_url": callback_url, "state": "publishing"}
    api.store.create_batch(batch_id, record)
    rows, sent, read, bad_counts = 0, [], 0, dict[str, int]()
    try:
        with api.client.app.producer_or_acquire() as producer:
            for chunk in chunks:
                rows, read = rows + chunk.rows, chunk.index + 1
                if rows > cap:
                    raise HTTPException(413, f"rows: more than {cap} in one batch "
                                        "(INFERQ_API_MAX_BATCH_ROWS)")
                if chunk.index >= len(ids):  # more rows than counted: not admitted
                    raise HTTPException(422, f"rows: more than {total} rows (the count "
                                        "before reading); send the file again")
                if _send(api, ref, spec.name, batch_id, chunk, producer, bad_counts, route):
                    sent.append(ids[chunk.index])
                else:
                    api.store.forget_open(ref.name, who.tenant, [ids[chunk.index]])
    except BaseException:
        api.store.claims.cancel(sent)  # whatever was sent will not run
        api.store.forget_open(ref.name, who.tenant, ids)
        api.store.update_batch(batch_id, state="failed")
        raise
    api.store.forget_open(ref.name, who.tenant, ids[read:])  # counted, but not in the file
    if not rows:
        api.store.update_batch(batch_id, state="failed")
        raise HTTPException(422, "rows: the batch has no rows")
    api.store.update_batch(batch_id, state="published", total=rows,
                           chunks=math.ceil(rows / chunk_rows), bad=bad_counts)
    if callback_url is not None:
        api.store.add_callback(f"batch:{batch_id}", time.time())
    audit("submit", who, batch_id=batch_id, model=model, rows=rows,
          refused=sum(bad_counts.values()))


def _admit(api: Api, who: Principal, model: str, ids: list[str], chunk_rows: int) -> None:
    """A batch enters whole or not at all, counted by its messages (chunks)."""
    limit = api.depth.limit(model)
    if not ids:
        return  # no rows: refused as such after reading
    if limit and len(ids) > limit:
        raise HTTPException(413, f"rows: this batch makes {len(ids)} messages of "
                            f"{chunk_rows} rows; model {model!r} queues at most {limit} "
                            f"(INFERQ_API_QUEUE_LIMIT): send at most {limit * chunk_rows} "
                            "rows per batch")
    api.admit_work(who, model, ids)


def _send(api: Api, ref: Any, input_name: str, batch_id: str, chunk: Chunk, producer: Any,
          bad_counts: dict[str, int], route: dict[str, Any]) -> bool:
    """-> whether a message was sent (False: no row of the chunk was valid)."""
    job_id = chunk_id(batch_id, chunk.index)
    if chunk.errors:
        api.store.add_bad_rows(batch_id, {e.row: e.message for e in chunk.errors})
        bad_counts[str(chunk.index)] = len(chunk.errors)
    if not len(chunk.keep):  # nothing valid to run: the chunk is done as it is
        api.store.store_final(job_id, {}, "SUCCESS")
        return False
    publish_chunk(api.client, ref, input_name, job_id, chunk, producer,
                  retry_policy=FAST_PUBLISH, **route)
    return True


@router.post("/batches", status_code=202, response_model=BatchView, openapi_extra=BATCH_BODY,
             summary="Enqueue many rows: JSON, NDJSON, or an uploaded file",
             responses={415: {"model": Problem, "description": "not JSON, NDJSON or "
                              "multipart/form-data"}})
async def submit_batch(
        request: Request, who: Who,
        priority: Annotated[Literal["normal", "high"], Query(
            description="high: taken before the model's normal backlog")] = "normal",
        expires_in: Annotated[float | None, Query(
            gt=0, le=7 * 86400, description="seconds; chunks no worker has started by "
            "then are not run: their rows fail as expired")] = None) -> Any:
    api = api_of(request)
    batch_id = uuid.uuid4().hex
    upload_dir = api.settings.home / "api-uploads"
    route = {"priority": priority, "deadline": deadline_after(expires_in)}
    try:
        model, callback_url, path = await _read_body(request, upload_dir, batch_id)
        await run_in_threadpool(_publish, api, who, batch_id, model, callback_url, path,
                                route)
    finally:  # also a partial upload (413, a client gone): nothing stays on disk
        for leftover in upload_dir.glob(f"{batch_id}.*"):
            leftover.unlink(missing_ok=True)
    view = await run_in_threadpool(batch_view, api, batch_id, who)
    return JSONResponse(view.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/batches/{batch_id}"})


# -- progress --------------------------------------------------------------------------------
class _Batch:
    """A batch record, read and checked against the caller's tenant."""

    def __init__(self, api: Api, batch_id: str, who: Principal):
        record = api.store.batch_record(batch_id)
        if record.get("tenant") != who.tenant or record.get("state") != "published":
            raise not_found("batch", batch_id)
        self.id = batch_id
        self.record = record
        self.total = int(record["total"])
        self.chunk_rows = int(record["chunk_rows"])
        self.chunks = int(record["chunks"])
        self.bad: dict[str, int] = json.loads(record.get("bad", "{}"))

    def rows_of(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_rows
        return start, min(self.total, start + self.chunk_rows) - start

    def chunk(self, api: Api, index: int) -> Chunk:
        """The chunk as sent: which rows were kept, the errors of the refused ones."""
        start, rows = self.rows_of(index)
        bad = api.store.bad_rows(self.id, start, start + rows) if self.bad.get(str(index)) \
            else {}
        keep = np.array([i for i in range(rows) if start + i not in bad], dtype=np.int64)
        errors = [RowError(row=r, message=m) for r, m in bad.items()]
        return Chunk(index, start, rows, np.empty(0), keep, errors)


def _count(batch: _Batch, index: int, meta: dict[str, Any]) -> tuple[int, int, int]:
    """(rows, failed rows, cancelled rows) of a finished chunk."""
    _, rows = batch.rows_of(index)
    refused = batch.bad.get(str(index), 0)
    if meta.get("status") == claims.CANCELLED_STATE:
        return rows, refused, rows - refused
    value = meta.get("result")
    if not isinstance(value, dict):
        return rows, rows, 0  # the whole chunk failed
    return rows, refused + len(value.get("errors", [])), 0


def batch_view(api: Api, batch_id: str, who: Principal) -> BatchView:
    batch = _Batch(api, batch_id, who)
    known = api.store.chunk_progress(batch_id)
    missing = [i for i in range(batch.chunks) if i not in known]
    new: dict[int, tuple[int, int, int]] = {}
    for first in range(0, len(missing), _MGET):
        part = missing[first:first + _MGET]
        metas = api.store.metas([chunk_id(batch_id, i) for i in part])
        for index, meta in zip(part, metas, strict=True):
            if meta is not None and is_final(meta):
                new[index] = _count(batch, index, meta)
    api.store.add_chunk_progress(batch_id, new)
    counts = list(known.values()) + list(new.values())
    done = sum(c[0] for c in counts)
    failed = sum(c[1] for c in counts)
    cancelled = sum(c[2] for c in counts)
    created = float(batch.record["created_at"])
    finished = len(counts) == batch.chunks
    if finished and "finished_at" not in batch.record:
        now = time.time()
        api.store.update_batch(batch_id, finished_at=now)
        batch.record["finished_at"] = str(now)  # so this answer's rate is the stored one's
    end = float(batch.record.get("finished_at", time.time()))
    elapsed = max(end - created, 1e-6)
    rate = done / elapsed if done else None
    status = ("cancelled" if "cancelled_at" in batch.record and finished else
              "completed" if finished else "running" if done else "queued")
    return BatchView(id=batch_id, model=batch.record["model"], status=status,
                     total=batch.total, done=done, failed=failed, cancelled=cancelled,
                     rows_per_s=None if rate is None else round(rate, 1),
                     eta_s=0.0 if finished else (None if not rate else
                                                 round((batch.total - done) / rate, 1)),
                     created_at=created, results=f"/v1/batches/{batch_id}/results",
                     callback=CallbackInfo.from_record(batch.record))


@router.get("/batches/{batch_id}", response_model=BatchView,
            summary="Counts (total, done, failed), rows/s and ETA")
def get_batch(batch_id: str, request: Request, who: Who) -> BatchView:
    return batch_view(api_of(request), batch_id, who)


@router.delete("/batches/{batch_id}", response_model=BatchView,
               summary="Cancel the rows of a batch that have not run")
def cancel_batch(batch_id: str, request: Request, who: Who) -> BatchView:
    api = api_of(request)
    batch_view(api, batch_id, who)  # counts what has finished so far
    batch = _Batch(api, batch_id, who)
    known = api.store.chunk_progress(batch_id)
    open_ids = [chunk_id(batch_id, i) for i in range(batch.chunks) if i not in known]
    api.store.update_batch(batch_id, cancelled_at=time.time())
    for first in range(0, len(open_ids), _MGET):
        api.store.cancel(open_ids[first:first + _MGET])
    audit("cancel", who, batch_id=batch_id, model=batch.record["model"], rows=batch.total,
          open_chunks=len(open_ids))
    return batch_view(api, batch_id, who)


# -- results ---------------------------------------------------------------------------------
def _lines(batch: _Batch, api: Api, index: int, meta: dict[str, Any], offset: int,
           specs: list[Any]) -> bytes:
    part = merge(batch.chunk(api, index), specs, result_value(meta))
    cut = set(part.truncated)
    out = []
    for i in range(part.rows):
        row = part.start + i
        if row < offset:
            continue
        line: dict[str, Any]
        if part.ok[i]:
            line = {"row": row, "ok": True,
                    "outputs": {k: v[i].tolist() for k, v in part.outputs.items()}}
            if row in cut:
                line["truncated"] = True
        else:
            line = {"row": row, "ok": False, "error": part.errors.get(row, "failed")}
        out.append(json.dumps(line))
    return ("\n".join(out) + "\n").encode() if out else b""


async def _stream(api: Api, batch: _Batch, offset: int, follow: bool) -> AsyncIterator[bytes]:
    version, _ = await run_in_threadpool(api.model, batch.record["ref"])
    specs = version.manifest.outputs
    for index in range(offset // batch.chunk_rows, batch.chunks):
        job_id = chunk_id(batch.id, index)
        for pause in backoff.pauses(0.005, 0.2):
            meta = (await run_in_threadpool(api.store.metas, [job_id]))[0]
            if meta is not None and is_final(meta):
                break
            if not follow:
                return
            await asyncio.sleep(pause)
        assert meta is not None  # the loop ends only at a final record
        yield await run_in_threadpool(_lines, batch, api, index, meta, offset, specs)


@router.get("/batches/{batch_id}/results", summary="Results as NDJSON, in input order",
            response_class=StreamingResponse,
            responses={200: {"content": {NDJSON: {"schema": {"type": "string"}}},
                             "description": "one JSON object per row: row, ok, outputs "
                             "or error"}})
async def batch_results(batch_id: str, request: Request, who: Who,
                        follow: Annotated[bool, Query(description="stay open until the "
                                                      "batch ends")] = False,
                        offset: Annotated[int, Query(ge=0, description="first row to "
                                                     "send")] = 0) -> StreamingResponse:
    api = api_of(request)
    batch = await run_in_threadpool(_Batch, api, batch_id, who)
    return StreamingResponse(_stream(api, batch, offset, follow), media_type=NDJSON)
