"""``producer.http`` against a mock transport: error mapping, bounded retries, streamed
bodies and results. The real API and worker: tests/integration/test_http_client.py."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

import producer.http.client as http_module
from producer.http import BLOCK_ROWS, ApiError, HttpClient
from producer.http.wire import ndjson
from shared.errors import (
    AuthError,
    Busy,
    InputError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ModelNotFound,
    RateLimited,
    Unavailable,
)
from shared.schemas import JobStatus

MODEL = {"name": "digits", "version": 1, "variant": "fp32", "task": "classification",
         "runtime": "onnx",
         "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 64]}],
         "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, 3]},
                     {"name": "label", "dtype": "int64", "shape": [-1]}]}


def view(status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    body = {"id": "j1", "status": status, "model": "digits", "version": 1,
            "variant": "fp32", "errors": [], "truncated": [],
            "timings": {"submitted_at": 1.0, "batch_rows": [1]}}
    if status == "succeeded":
        body["outputs"] = {"probabilities": [[0.25, 0.5, 0.25]], "label": [1]}
    return {**body, **extra}


Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **kwargs: Any) -> tuple[HttpClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/v1/models/") and request.method == "GET":
            return httpx.Response(200, json=MODEL)
        return handler(request)

    return HttpClient("http://api.test", "key", transport=httpx.MockTransport(record),
                      **kwargs), seen


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the pauses between retries instead of sleeping them."""
    slept: list[float] = []
    monkeypatch.setattr(http_module.time, "sleep", slept.append)
    return slept


def test_get_converts_outputs_with_the_manifest_dtypes_and_caches_it() -> None:
    c, seen = client(lambda r: httpx.Response(200, json=view()))
    for _ in range(2):
        res = c.get("j1")
        assert res.status is JobStatus.succeeded and res.batch_rows == [1]
        assert res.outputs is not None
        assert res.outputs["probabilities"].dtype == np.float32
        assert res.outputs["label"].dtype == np.int64
    assert [r.url.path for r in seen].count("/v1/models/digits:fp32@1") == 1
    assert seen[0].headers["authorization"] == "Bearer key"


def test_job_result_raises_like_the_sdk() -> None:
    answers = {"j1": view("failed", error="RuntimeError: boom"),
               "j2": view("cancelled", error="cancelled before it ran"),
               "j3": view(errors=[{"row": 0, "field": "image", "message": "row 0: bad"}])}
    c, _ = client(lambda r: httpx.Response(200, json=answers[r.url.path.rsplit("/")[-1]]))
    with pytest.raises(JobFailed, match="boom"):
        c.job("j1").result()
    with pytest.raises(JobCancelled):  # a JobFailed too, as Client's Job.result raises
        c.job("j2").result()
    with pytest.raises(JobFailed, match="row 0: bad"):
        c.job("j3").result()


def test_wait_long_polls_until_final_then_times_out() -> None:
    answers = iter([view("queued"), view("running"), view()])
    c, seen = client(lambda r: httpx.Response(200, json=next(answers)))
    assert c.wait("j1", timeout=10).status is JobStatus.succeeded
    waits = [r.url.params.get("wait") for r in seen if r.url.path == "/v1/jobs/j1"]
    assert all(w and w.endswith("ms") and 0 < int(w[:-2]) <= 10_000 for w in waits)
    c2, _ = client(lambda r: httpx.Response(200, json=view("queued")))
    with pytest.raises(TimeoutError, match="status queued"):
        c2.wait("j1", timeout=0)


@pytest.mark.parametrize(("status", "body", "error"), [
    (401, {"detail": "missing or unknown API key"}, AuthError),
    (404, {"detail": "no job 'x' (never submitted, expired, or not yours)"}, JobNotFound),
    (404, {"detail": "Not Found"}, ApiError),  # no such route: a wrong base URL
    (409, {"detail": "conflict"}, ApiError),
    (500, {"detail": "Internal Server Error"}, ApiError),
])
def test_error_answers_map_to_sdk_errors(status: int, body: dict, error: type) -> None:
    c, _ = client(lambda r: httpx.Response(status, json=body), retries=0)
    with pytest.raises(error, match=body["detail"][:10]):
        c.get("x")


def test_input_errors_name_row_and_field() -> None:
    c, _ = client(lambda r: httpx.Response(
        422, json={"detail": "row 1, field 'image': contains NaN", "row": 1,
                   "field": "image"}))
    with pytest.raises(InputError) as info:
        c.submit("digits", np.zeros((2, 64), np.float32))
    assert (info.value.row, info.value.field) == (1, "image")
    c2, _ = client(lambda r: httpx.Response(404, json={"detail": "no model", "field": "model"}))
    with pytest.raises(ModelNotFound):
        c2.submit("nope", [0.0] * 64)
    c3, _ = client(lambda r: httpx.Response(413, text="too big"))  # not JSON
    with pytest.raises(InputError, match="too big"):
        c3.submit_many("digits", np.zeros((3, 64)))


def test_429_is_retried_after_retry_after_then_succeeds(sleeps: list[float]) -> None:
    answers = iter([httpx.Response(429, json={"detail": "over its rate limit"},
                                   headers={"Retry-After": "2"})] * 2
                   + [httpx.Response(202, json={"id": "j9", "status": "queued",
                                                "location": "/v1/jobs/j9"})])
    c, seen = client(lambda r: next(answers))
    job = c.submit("digits", np.zeros(64, np.float32))
    assert job.id == "j9" and sleeps == [2.0, 2.0]
    assert len([r for r in seen if r.method == "POST"]) == 3


def test_retries_are_bounded(sleeps: list[float]) -> None:
    busy = httpx.Response(429, json={"detail": "queue full"}, headers={"Retry-After": "3"})
    c, seen = client(lambda r: busy, retries=2)
    with pytest.raises(RateLimited) as info:
        c.get("j1")
    assert info.value.retry_after == 3.0 and isinstance(info.value, Busy)
    assert sleeps == [3.0, 3.0] and len(seen) == 3
    sleeps.clear()
    c2, _ = client(lambda r: busy, max_retry_wait=1.0)  # the server asks for too long
    with pytest.raises(Busy):
        c2.get("j1")
    assert sleeps == []
    down = httpx.Response(503, json={"detail": "broker down"}, headers={"Retry-After": "1"})
    c3, seen3 = client(lambda r: down, retries=0)
    with pytest.raises(Unavailable) as unavailable:
        c3.get("j1")
    assert unavailable.value.retry_after == 1.0 and len(seen3) == 1


def test_a_503_while_long_polling_a_submit_is_not_resent(sleeps: list[float]) -> None:
    c, seen = client(lambda r: httpx.Response(503, json={"detail": "store down"}))
    with pytest.raises(Unavailable):
        c.submit("digits", [0.0] * 64, wait=2)  # the job may already be enqueued
    assert len(seen) == 1 and seen[0].url.params["wait"] == "2000ms"


def test_submit_many_streams_ndjson_and_resends_only_what_it_can(
        sleeps: list[float]) -> None:
    bodies: list[bytes] = []
    answers = iter([httpx.Response(429, json={"detail": "slow down"},
                                   headers={"Retry-After": "0"}),
                    httpx.Response(202, json={"id": "b1", "model": "digits",
                                              "status": "queued", "total": 3000, "done": 0,
                                              "failed": 0, "created_at": 1.0})])

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        assert request.headers["content-type"] == "application/x-ndjson"
        assert "content-length" not in request.headers  # streamed, chunked
        assert request.url.params["model"] == "digits"
        return next(answers)

    c, _ = client(handler)
    rows = np.arange(3000 * 64, dtype=np.float32).reshape(3000, 64)
    batch = c.submit_many("digits", rows)
    assert batch.id == "b1" and len(bodies) == 2 and bodies[0] == bodies[1]
    lines = bodies[0].decode().splitlines()
    assert len(lines) == 3000 and json.loads(lines[2]) == rows[2].tolist()

    once = client(lambda r: httpx.Response(429, json={"detail": "slow"},
                                           headers={"Retry-After": "0"}))[0]
    with pytest.raises(Busy):  # a one-shot iterator cannot be sent again
        once.submit_many("digits", (r for r in rows))


def test_ndjson_encodes_lazily_any_kind_of_row() -> None:
    taken = itertools.count()

    def endless() -> Iterator[list[float]]:
        while True:
            next(taken)
            yield [1.0, 2.0]

    first = next(ndjson(endless()))
    assert first.count(b"\n") == BLOCK_ROWS and next(taken) <= BLOCK_ROWS + 1
    mixed = [np.float32([1, 2]), {"image": np.arange(2)}, "text", [np.int64(3)]]
    assert b"".join(ndjson(mixed)).decode().splitlines() == \
        ['[1.0,2.0]', '{"image":[0,1]}', '"text"', "[3]"]
    with pytest.raises(InputError):
        list(ndjson("one string is not many rows"))


class _Broken(httpx.SyncByteStream):
    """Sends some lines, then the connection drops."""

    def __init__(self, lines: list[dict[str, Any]], broken: bool):
        self.data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        self.broken = broken

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        if self.broken:
            raise httpx.ReadError("connection reset")


def line(row: int) -> dict[str, Any]:
    if row == 2:
        return {"row": 2, "ok": False, "error": "row 2, field 'image': contains NaN"}
    return {"row": row, "ok": True, "outputs": {"probabilities": [0.5, 0.25, 0.25],
                                                "label": row}}


def test_batch_results_resume_a_dropped_stream_in_input_order() -> None:
    offsets: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/batches/b1/results":
            offset = int(request.url.params["offset"])
            offsets.append(request.url.params["offset"])
            assert request.url.params["follow"] == "true"
            end = 3 if offset == 0 else 5
            return httpx.Response(200, stream=_Broken([line(r) for r in range(offset, end)],
                                                      broken=offset == 0))
        return httpx.Response(200, json={"id": "b1", "model": "digits", "status": "running",
                                         "total": 5, "done": 3, "failed": 1,
                                         "created_at": 1.0})

    c, _ = client(handler)
    batch = c.batch("b1")
    res = batch.results(timeout=5)
    assert offsets == ["0", "3"]
    assert len(res) == 5 and res.ok.tolist() == [True, True, False, True, True]
    assert res.errors == {2: "row 2, field 'image': contains NaN"}
    assert res.outputs["label"].dtype == np.int64 and res.outputs["label"].tolist() == \
        [0, 1, 0, 3, 4]
    assert res.outputs["probabilities"].dtype == np.float32
    rows = list(batch.iter_rows(offset=3))
    assert [r.row for r in rows] == [3, 4] and int(rows[0].outputs["label"]) == 3  # type: ignore[index]
