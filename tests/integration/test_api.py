"""The HTTP results API in process: ``httpx.ASGITransport`` against the app that
``create_app`` builds (its lifespan entered), with real Redis and real worker subprocesses.

Every route, and every error code the API documents: 401, 404 (also for another tenant's
id), 409, 413, 415, 422 naming row and field, 429 (rate limit and queue backpressure), 503.
Waits are long polls (``?wait=``, ``?follow=true``) or bounded polling loops, never fixed
sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from producer.bulk.batch import chunk_id
from shared import signing
from shared.queues import queue_name
from shared.settings import Settings, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

KEYS = "acme:key-a,beta:key-b"
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
SECRET = "test-callback-secret"
HEX32 = re.compile(r"^[0-9a-f]{32}$")



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- helpers ---------------------------------------------------------------------------------
def settings_for(env: dict[str, str], **overrides: Any) -> Settings:
    """Settings from the fixture's INFERQ_* variables (as ``client_for``), plus overrides."""
    values: dict[str, Any] = {k[len("INFERQ_"):].lower(): v for k, v in env.items()
                              if k.startswith("INFERQ_")}
    # The callback receivers of these tests listen on 127.0.0.1: allow that here.
    return load_settings(**{**values, "api_keys": KEYS, "callback_secret": SECRET,
                            "callback_allow_private": True, **overrides})


@contextlib.asynccontextmanager
async def serve(env: dict[str, str], **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client (tenant acme's key by default) of a fresh app, its lifespan running."""
    app = create_app(settings_for(env, **overrides), callback_backoff_s=0.05)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inferq.test",
                                     headers=A) as client:
            yield client


@pytest.fixture
async def api(redis_env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(redis_env) as client:
        yield client


@pytest.fixture
def worker(redis_env: dict[str, str], start_worker: Any) -> Any:
    """One worker serving digits, ready before the test starts."""
    return start_worker(redis_env)


async def until(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """Poll ``probe`` with growing pauses until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)


async def submit(client: httpx.AsyncClient, inputs: Any, wait: str | None = None,
                 **kwargs: Any) -> httpx.Response:
    params = {"wait": wait} if wait else None
    return await client.post("/v1/models/digits/jobs", json={"inputs": inputs},
                             params=params, **kwargs)


def rows(digits: dict[str, np.ndarray], index: slice | list[int]) -> list[Any]:
    return digits["x"][index].tolist()  # type: ignore[no-any-return]


def assert_outputs(outputs: dict[str, Any], digits: dict[str, np.ndarray],
                   index: slice | list[int]) -> None:
    np.testing.assert_array_equal(outputs["label"], digits["label"][index])
    np.testing.assert_allclose(outputs["probabilities"], digits["probabilities"][index],
                               rtol=1e-5, atol=1e-6)


def depth(env: dict[str, str]) -> int:
    """Messages waiting in the digits queue (a Redis list on a Redis broker)."""
    name = queue_name(settings_for(env), "digits")
    return int(redis.Redis.from_url(env["INFERQ_BROKER_URL"]).llen(name))


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


async def results(client: httpx.AsyncClient, batch_id: str, **params: Any
                  ) -> list[dict[str, Any]]:
    with anyio.fail_after(60):
        r = await client.get(f"/v1/batches/{batch_id}/results", params=params)
    assert r.status_code == 200, r.text
    return ndjson(r)


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    for word in words:
        assert word in body["detail"], (word, body)
    return body


async def log_says(w: Any, text: str) -> bool:
    return text in Path(w.log).read_text(errors="replace")


# -- jobs ------------------------------------------------------------------------------------
async def test_submit_answers_202_with_location_and_an_unguessable_id(api, digits):
    first, second = [await submit(api, rows(digits, 0)) for _ in range(2)]
    assert first.status_code == second.status_code == 202
    body = first.json()
    assert HEX32.match(body["id"]) and body["id"] != second.json()["id"]
    assert first.headers["location"] == body["location"] == f"/v1/jobs/{body['id']}"
    assert body["status"] == "queued"
    view = (await api.get(body["location"])).json()
    assert view["status"] == "queued" and view["model"] == "digits"
    assert view["outputs"] is None and view["timings"]["submitted_at"] > 0


async def test_wait_returns_the_outputs_of_in_process_onnx(worker, api, digits):
    r = await submit(api, rows(digits, 0), wait="20s")  # the first call loads the model
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    assert_outputs(r.json()["outputs"], digits, slice(0, 1))
    r = await submit(api, rows(digits, slice(1, 4)), wait="2s")  # a few rows in one job
    assert r.status_code == 200, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert_outputs(r.json()["outputs"], digits, slice(1, 4))


async def test_named_inputs(worker, api, digits):
    r = await submit(api, {"image": digits["x"][5].reshape(8, 8).tolist()}, wait="20s")
    assert r.status_code == 200, r.text
    assert_outputs(r.json()["outputs"], digits, slice(5, 6))


async def test_get_reports_status_and_timings(worker, api, digits):
    r = await submit(api, rows(digits, slice(0, 2)))
    job_id = r.json()["id"]
    view = (await api.get(f"/v1/jobs/{job_id}", params={"wait": "20s"})).json()
    assert view["status"] == "succeeded", view
    assert (view["version"], view["variant"]) == (1, "fp32")
    assert view["worker"] and view["errors"] == [] and view["error"] is None
    t = view["timings"]
    assert t["submitted_at"] <= t["started_at"] <= t["finished_at"] <= time.time()
    assert t["queue_wait_s"] == pytest.approx(t["started_at"] - t["submitted_at"], abs=1e-5)
    assert t["run_s"] == pytest.approx(t["finished_at"] - t["started_at"], abs=1e-5)
    assert t["batch_rows"] and all(n >= 2 for n in t["batch_rows"])
    again = (await api.get(f"/v1/jobs/{job_id}")).json()  # no wait: read as it is
    assert again == view
    assert_outputs(view["outputs"], digits, slice(0, 2))


async def test_cancel_a_queued_job_and_it_never_runs(redis_env, api, start_worker, digits):
    job_id = (await submit(api, rows(digits, 0))).json()["id"]
    r = await api.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["outputs"] is None
    assert_problem(await api.delete(f"/v1/jobs/{job_id}"), 409, "already cancelled")
    w = await anyio.to_thread.run_sync(start_worker, redis_env)
    # The queue is first in, first out: once a later job ran, the cancelled one was taken.
    later = await submit(api, rows(digits, 1), wait="20s")
    assert later.json()["status"] == "succeeded"
    await until(lambda: log_says(w, f"jobs cancelled before they ran; skipped: {job_id}"),
                "the worker to skip the cancelled job")
    view = (await api.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "cancelled" and view["outputs"] is None, view
    assert view["error"] == "cancelled before it ran" and view["worker"] is None
    assert_problem(await api.delete(f"/v1/jobs/{later.json()['id']}"), 409,
                   "already succeeded")


async def test_priority_and_expiry(redis_env, api, start_worker, digits):
    high = await api.post("/v1/models/digits/jobs",
                          json={"inputs": rows(digits, 0), "priority": "high"})
    late = await api.post("/v1/models/digits/jobs",
                          json={"inputs": rows(digits, 1), "expires_in": 0.2})
    batch = await api.post("/v1/batches", params={"priority": "high", "expires_in": "0.2"},
                           json={"model": "digits", "rows": rows(digits, slice(0, 3))})
    assert high.status_code == late.status_code == batch.status_code == 202, batch.text
    r = redis.Redis.from_url(redis_env["INFERQ_BROKER_URL"])
    high_queue = queue_name(settings_for(redis_env), "digits", "high")
    assert (r.llen(high_queue), depth(redis_env)) == (2, 1)  # job + 1 chunk; the late job
    for body, field in (({"priority": "urgent"}, "priority"), ({"expires_in": -1},
                                                               "expires_in")):
        bad = await api.post("/v1/models/digits/jobs", json={"inputs": rows(digits, 0),
                                                             **body})
        assert assert_problem(bad, 422)["field"] == field
    await anyio.sleep(0.3)
    await anyio.to_thread.run_sync(start_worker, redis_env)
    view = (await api.get(f"/v1/jobs/{late.json()['id']}", params={"wait": "20s"})).json()
    assert view["status"] == "expired" and "deadline" in view["error"], view
    view = (await api.get(f"/v1/jobs/{high.json()['id']}", params={"wait": "20s"})).json()
    assert view["status"] == "succeeded", view
    batch_id = batch.json()["id"]
    lines = await results(api, batch_id)
    assert [line["row"] for line in lines] == [0, 1, 2]
    assert all("JobExpired" in line["error"] for line in lines), lines


async def test_get_and_delete_of_an_unknown_job_answer_404(api):
    for method in ("GET", "DELETE"):
        body = assert_problem(await api.request(method, f"/v1/jobs/{'0' * 32}"), 404,
                              "0" * 32)
        assert set(body) == {"detail"}


# -- authentication and tenants --------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": "Basic key-a"},
                                     {"Authorization": "key-a"}],
                         ids=["none", "unknown-key", "not-bearer", "no-scheme"])
async def test_requests_without_a_valid_key_get_401(redis_env, headers, digits):
    async with serve(redis_env) as api:
        api.headers.pop("Authorization")
        for method, path, body in [("GET", "/v1/models", None),
                                   ("GET", "/v1/models/digits", None),
                                   ("POST", "/v1/models/digits/jobs", {"inputs": rows(digits, 0)}),
                                   ("GET", f"/v1/jobs/{'0' * 32}", None),
                                   ("DELETE", f"/v1/jobs/{'0' * 32}", None),
                                   ("POST", "/v1/batches", {"model": "digits", "rows": [[0]]}),
                                   ("GET", f"/v1/batches/{'0' * 32}/results", None)]:
            r = await api.request(method, path, json=body, headers=headers)
            assert_problem(r, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert depth(redis_env) == 0  # nothing was enqueued
        assert (await api.get("/healthz")).status_code == 200  # ops routes need no key


async def test_another_tenants_job_reads_as_missing(api, digits):
    job_id = (await submit(api, rows(digits, 0))).json()["id"]
    missing = "f" * 32
    for method in ("GET", "DELETE"):
        theirs = await api.request(method, f"/v1/jobs/{job_id}", headers=B)
        absent = await api.request(method, f"/v1/jobs/{missing}", headers=B)
        assert theirs.status_code == absent.status_code == 404
        assert theirs.json() == {"detail": absent.json()["detail"].replace(missing, job_id)}
    assert (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == "queued"  # not cancelled


async def test_another_tenants_batch_reads_as_missing(api, digits):
    r = await api.post("/v1/batches", json={"model": "digits", "rows": rows(digits, slice(3))})
    batch_id = r.json()["id"]
    missing = "e" * 32
    for method, suffix in [("GET", ""), ("DELETE", ""), ("GET", "/results")]:
        theirs = await api.request(method, f"/v1/batches/{batch_id}{suffix}", headers=B)
        absent = await api.request(method, f"/v1/batches/{missing}{suffix}", headers=B)
        assert theirs.status_code == absent.status_code == 404
        assert theirs.json() == {"detail": absent.json()["detail"].replace(missing, batch_id)}
    view = (await api.get(f"/v1/batches/{batch_id}")).json()
    assert view["status"] == "queued" and view["cancelled"] == 0


async def test_tenants_stay_apart_under_concurrent_load(redis_env, worker, digits):
    """Two tenants submit 60 jobs and 4 batches each at once while the worker runs them;
    every cross-tenant read, wait or cancel is a 404, every own read is right. (No rate
    limit here: ~200 requests a tenant within a second would otherwise get 429s.)"""
    async with serve(redis_env, api_rate_per_s=0) as api:
        await _two_tenants(api, digits)


async def _two_tenants(api: httpx.AsyncClient, digits: dict[str, np.ndarray]) -> None:
    async def tenant(headers: dict[str, str]) -> tuple[list[str], list[str]]:
        jobs = await asyncio.gather(*(api.post("/v1/models/digits/jobs", headers=headers,
                                               json={"inputs": rows(digits, i)})
                                      for i in range(60)))
        batches = await asyncio.gather(*(api.post(
            "/v1/batches", headers=headers,
            json={"model": "digits", "rows": rows(digits, slice(i, i + 5))})
            for i in range(4)))
        assert all(r.status_code == 202 for r in [*jobs, *batches])
        return [r.json()["id"] for r in jobs], [r.json()["id"] for r in batches]

    (a_jobs, a_batches), (b_jobs, b_batches) = await asyncio.gather(tenant(A), tenant(B))

    async def cross(headers: dict[str, str], jobs: list[str], batches: list[str]) -> None:
        reads = await asyncio.gather(
            *(api.get(f"/v1/jobs/{j}", headers=headers, params={"wait": "1s"}) for j in jobs),
            *(api.get(f"/v1/batches/{b}", headers=headers) for b in batches),
            *(api.get(f"/v1/batches/{b}/results", headers=headers) for b in batches),
            *(api.delete(f"/v1/jobs/{j}", headers=headers) for j in jobs[:10]))
        assert {r.status_code for r in reads} == {404}

    await asyncio.gather(cross(B, a_jobs, a_batches), cross(A, b_jobs, b_batches))
    for headers, jobs, batches in ((A, a_jobs, a_batches), (B, b_jobs, b_batches)):
        views = await asyncio.gather(*(api.get(f"/v1/jobs/{j}", headers=headers,
                                               params={"wait": "20s"}) for j in jobs))
        assert [v.json()["status"] for v in views] == ["succeeded"] * 60
        labels = [v.json()["outputs"]["label"][0] for v in views]
        assert labels == [int(v) for v in digits["label"][:60]]
        for b in batches:
            view = (await api.get(f"/v1/batches/{b}", headers=headers)).json()
            assert view["total"] == 5


# -- limits ----------------------------------------------------------------------------------
async def test_a_body_over_the_limit_gets_413(redis_env, digits):
    async with serve(redis_env, api_max_body_bytes=4096) as api:
        assert (await submit(api, rows(digits, 0))).status_code == 202  # under the limit
        big = rows(digits, slice(0, 20))  # about 6 KB of JSON
        assert_problem(await submit(api, big), 413, "INFERQ_API_MAX_BODY_BYTES")
        lines = "".join(json.dumps(r) + "\n" for r in big).encode()

        async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            for start in range(0, len(lines), 1000):
                yield lines[start:start + 1000]

        r = await api.post("/v1/batches", params={"model": "digits"}, content=streamed(),
                           headers={"content-type": "application/x-ndjson"})
        assert_problem(r, 413, "INFERQ_API_MAX_BODY_BYTES")
        assert depth(redis_env) == 1  # only the first job


async def test_too_many_rows_get_413(redis_env, digits):
    async with serve(redis_env, api_max_job_rows=2, api_max_batch_rows=4) as api:
        assert (await submit(api, rows(digits, slice(0, 2)))).status_code == 202
        assert_problem(await submit(api, rows(digits, slice(0, 3))), 413,
                       "INFERQ_API_MAX_JOB_ROWS", "/v1/batches")
        r = await api.post("/v1/batches", json={"model": "digits",
                                                "rows": rows(digits, slice(0, 5))})
        assert_problem(r, 413, "INFERQ_API_MAX_BATCH_ROWS")
        assert depth(redis_env) == 1


@pytest.mark.parametrize(("inputs", "row", "field", "words"), [
    ([0.0] * 63, 0, "image", ["64 values", "(63,)"]),
    ("a seven", 0, "image", ["got text"]),
    ({"pixels": [0.0] * 64}, None, None, ["'pixels'", "'image'"]),
    ([[0.0] * 64, [0.0] * 60], 1, "image", ["row 1"]),
    (None, 0, "image", ["expected numbers"]),
], ids=["wrong-shape", "text-for-numbers", "unknown-input", "ragged-rows", "null"])
async def test_invalid_input_gets_422_naming_row_and_field(redis_env, api, inputs, row, field,
                                                           words):
    body = assert_problem(await submit(api, inputs), 422, *words)
    assert body.get("row") == row and body.get("field") == field
    assert depth(redis_env) == 0


async def test_bad_requests_get_422(redis_env, api, digits):
    body = assert_problem(await submit(api, rows(digits, 0), wait="soon"), 422, "'soon'")
    assert body["field"] == "wait"
    assert_problem(await api.get(f"/v1/jobs/{'0' * 32}", params={"wait": "-1s"}), 422)
    body = assert_problem(await api.post("/v1/models/digits/jobs", json={"inputs": [0],
                                                                         "extra": 1}), 422)
    assert body["field"] == "extra"
    body = assert_problem(await api.post("/v1/models/digits/jobs", content=b"{not json",
                                         headers={"content-type": "application/json"}), 422)
    assert body["field"] == "body"
    assert_problem(await api.post("/v1/models/Bad..Name/jobs", json={"inputs": [0]}), 422,
                   "invalid")
    assert_problem(await api.post("/v1/batches", json={"model": "digits", "rows": []}), 422,
                   "rows")
    assert_problem(await api.post("/v1/batches", content=b"[1]\n",
                                  headers={"content-type": "application/x-ndjson"}), 422,
                   "?model=")
    r = await api.post("/v1/batches", data={"model": "digits"},
                       files={"file": ("rows.xlsx", b"x", "application/octet-stream")})
    assert_problem(r, 422, "'.xlsx'")
    assert depth(redis_env) == 0


async def test_unknown_model_gets_404(api, digits):
    for r in [await api.post("/v1/models/nope/jobs", json={"inputs": rows(digits, 0)}),
              await api.get("/v1/models/nope"),
              await api.post("/v1/batches", json={"model": "nope", "rows": [[0.0] * 64]})]:
        assert assert_problem(r, 404, "'nope'")["field"] == "model"


async def test_batches_refuse_other_content_types_with_415(api):
    for kind in ("text/plain", "text/csv", None):
        headers = {"content-type": kind} if kind else {}
        assert_problem(await api.post("/v1/batches", content=b"1,2,3", headers=headers),
                       415, "application/json")


async def test_rate_limit_gets_429(redis_env):
    async with serve(redis_env, api_rate_per_s=3) as api:
        burst = await asyncio.gather(*(api.get("/v1/models") for _ in range(12)))
        codes = [r.status_code for r in burst]
        # The first window lets 3 through; 12 at once cannot all fit in 3-request windows.
        assert set(codes) == {200, 429} and codes.count(200) >= 3, codes
        limited = next(r for r in burst if r.status_code == 429)
        assert_problem(limited, 429, "'acme'", "rate limit")
        assert limited.headers["retry-after"] == "1"
        assert (await api.get("/v1/models", headers=B)).status_code == 200  # per tenant


async def test_queue_backpressure_gets_429_with_retry_after(redis_env, digits):
    async with serve(redis_env) as api:  # no worker: these six stay queued
        for i in range(6):
            assert (await submit(api, rows(digits, i))).status_code == 202
    assert depth(redis_env) == 6
    async with serve(redis_env, api_queue_limit=5) as api:  # its first look sees six
        r = await submit(api, rows(digits, 0))
        assert_problem(r, 429, "6 messages waiting", "limit 5")
        assert int(r.headers["retry-after"]) >= 1
        r = await api.post("/v1/batches", json={"model": "digits", "rows": rows(digits, 0)})
        assert_problem(r, 429, "limit 5")
        assert (await api.get("/v1/models")).status_code == 200  # reads are not throttled
    assert depth(redis_env) == 6  # nothing more was enqueued


def test_a_tenants_open_work_forgets_what_workers_claimed(redis_env):
    """The admission script against real Redis: ids a worker claimed (or a cancel did) and
    ids older than the result expiry leave the tenant's count; the rest stay."""
    from celery import Celery

    from api.store import Admission, ApiStore
    from shared import keys

    settings = settings_for(redis_env)
    store = ApiStore(settings, Celery(backend=settings.effective_result_backend()))
    ids = [f"fair-{i}" for i in range(6)]

    def admit(tenant: str, ids: list[str], share: int, depth: int) -> tuple[bool, int]:
        return store.admit(Admission("digits", tenant, share, depth, 100), ids)

    assert admit("acme", ids[:4], share=4, depth=0) == (True, 0)
    assert admit("acme", ids[4:], share=4, depth=99) == (False, 4)
    store.redis.set(keys.claim(ids[0]), "run", ex=60)
    store.redis.set(keys.claim(ids[2]), "cancelled", ex=60)
    store.redis.zadd(store.open_key("digits", "acme"), {ids[3]: time.time() - store.expires - 1})
    assert admit("acme", ids[4:], share=4, depth=99) == (True, 1)
    assert admit("beta", ["b"], share=1, depth=500) == (True, 0)
    assert admit("beta", ["c"], share=1, depth=500) == (False, 1)
    store.forget_open("digits", "acme", ids)
    assert store.redis.zcard(store.open_key("digits", "acme")) == 0
    store.redis.delete(keys.claim(ids[0]), keys.claim(ids[2]), store.open_key("digits", "beta"))


def test_a_job_is_admitted_and_recorded_in_one_round_trip_and_a_refusal_keeps_nothing(
        redis_env):
    """``create_job`` with an admission: admitted -> recorded as queued and counted as
    the tenant's open work; refused -> neither record nor queued result is left; a server
    that lost the script (a restart) still admits."""
    from celery import Celery

    from api.store import _ADMIT, Admission, ApiStore

    settings = settings_for(redis_env)
    store = ApiStore(settings, Celery(backend=settings.effective_result_backend()))
    record = {"tenant": "acme", "model": "digits", "rows": 1, "submitted_at": time.time()}
    full = Admission("digits", "acme", share=1, depth=100, limit=100)
    ids = [f"one-trip-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        # a script this server never saw, as after a restart: EVALSHA answers NOSCRIPT
        store._admit = store.redis.register_script(f"{_ADMIT}\n-- {ids[0]}")
        flat, held = store.create_job(ids[0], record, callback=False, admission=full)
        assert held is None and store.job_record(ids[0])["tenant"] == "acme"
        assert store.redis.exists(store.meta_key(ids[0]))
        assert store.redis.zscore(store.open_key("digits", "acme"), ids[0]) is not None
        _, held = store.create_job(ids[1], record, callback=True, admission=full)
        assert held == 1  # the tenant's share is 1 and the queue is full: refused
        assert not store.redis.exists(store.job_key(ids[1]), store.meta_key(ids[1]))
        assert store.redis.zscore(store.callbacks_key, f"job:{ids[1]}") is None
        assert store.redis.zscore(store.open_key("digits", "acme"), ids[1]) is None
        _, held = store.create_job(ids[2], record, callback=False)  # no limit: no admission
        assert held is None and store.job_record(ids[2])
    finally:
        for job_id in ids:
            store.drop_job(job_id)
        store.forget_open("digits", "acme", ids)


async def test_broker_outage_gets_503_and_enqueues_nothing(redis_env, digits):
    async with serve(redis_env, broker_url="redis://127.0.0.1:1/0") as api:
        r = await submit(api, rows(digits, 0))
        assert_problem(r, 503, "broker")
        assert r.headers["retry-after"] == "5"
        ready = await api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["result_store"] == "ok" and ready.json()["broker"] != "ok"
        # The job record written before publishing was removed.
        store = redis.Redis.from_url(redis_env["INFERQ_RESULT_BACKEND"])
        assert not store.keys(f"{redis_env['INFERQ_QUEUE_PREFIX']}inferq-api-job-*")


# -- batches ---------------------------------------------------------------------------------
async def test_json_batch_bad_rows_fail_alone(redis_env, worker, digits):
    body = rows(digits, slice(0, 10))
    body[3], body[7] = [1.0, 2.0], "seven"
    async with serve(redis_env, chunk_rows=4) as api:
        r = await api.post("/v1/batches", json={"model": "digits", "rows": body})
        assert r.status_code == 202, r.text
        batch = r.json()
        assert HEX32.match(batch["id"]) and r.headers["location"] == f"/v1/batches/{batch['id']}"
        assert (batch["total"], batch["results"]) == (10, f"/v1/batches/{batch['id']}/results")
        lines = await results(api, batch["id"], follow="true")
        assert [line["row"] for line in lines] == list(range(10))
        assert [line["ok"] for line in lines] == [i not in (3, 7) for i in range(10)]
        assert "64 values" in lines[3]["error"] and "image" in lines[7]["error"]
        good = [i for i in range(10) if i not in (3, 7)]
        assert_outputs({k: [lines[i]["outputs"][k] for i in good] for k in ("label",
                        "probabilities")}, digits, good)
        view = (await api.get(f"/v1/batches/{batch['id']}")).json()
        assert (view["status"], view["total"], view["done"], view["failed"]) == \
            ("completed", 10, 10, 2)
        assert view["rows_per_s"] > 0 and view["eta_s"] == 0


async def test_ndjson_batch_and_results_from_an_offset(redis_env, worker, digits):
    body = "".join(json.dumps(r) + "\n" for r in rows(digits, slice(0, 9))).encode()
    async with serve(redis_env, chunk_rows=4) as api:
        r = await api.post("/v1/batches", params={"model": "digits"}, content=body,
                           headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        everything = await results(api, batch_id, follow="true")
        assert [line["row"] for line in everything] == list(range(9))
        tail = await results(api, batch_id, offset=5)
        assert tail == everything[5:]
        assert await results(api, batch_id, offset=9) == []
        assert_outputs({"label": [t["outputs"]["label"] for t in tail],
                        "probabilities": [t["outputs"]["probabilities"] for t in tail]},
                       digits, slice(5, 9))


@pytest.mark.parametrize("kind", ["npy", "csv"])
async def test_uploaded_files(redis_env, worker, digits, kind):
    x = digits["x"][:6]
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, x)
        data = buffer.getvalue()
    else:
        text = io.StringIO()
        out = csv.writer(text)
        out.writerow([f"p{i}" for i in range(64)])
        out.writerows(x.reshape(6, 64).tolist())
        data = text.getvalue().encode()
    async with serve(redis_env, chunk_rows=4) as api:
        r = await api.post("/v1/batches", data={"model": "digits"},
                           files={"file": (f"rows.{kind}", data, "application/octet-stream")})
        assert r.status_code == 202, r.text
        assert r.json()["total"] == 6
        lines = await results(api, r.json()["id"], follow="true")
    assert all(line["ok"] for line in lines) and len(lines) == 6
    assert_outputs({k: [line["outputs"][k] for line in lines] for k in ("label",
                    "probabilities")}, digits, slice(0, 6))


async def test_progress_of_a_partly_finished_batch(redis_env, digits):
    """No worker: the first chunk has only refused rows, so it is done when published."""
    body = ["bad", [1.0]] + rows(digits, slice(0, 4))
    async with serve(redis_env, chunk_rows=2) as api:
        r = await api.post("/v1/batches", json={"model": "digits", "rows": body})
        view = (await api.get(r.headers["location"])).json()
        assert (view["status"], view["total"], view["done"], view["failed"]) == \
            ("running", 6, 2, 2)
        assert view["rows_per_s"] > 0
        assert view["eta_s"] == pytest.approx(4 / view["rows_per_s"], abs=0.1)  # 0.1 s steps
        lines = await results(api, view["id"])  # not following: what has finished
        assert [(line["row"], line["ok"]) for line in lines] == [(0, False), (1, False)]


async def test_cancel_a_batch_before_it_runs(redis_env, start_worker, digits):
    async with serve(redis_env, chunk_rows=2) as api:
        r = await api.post("/v1/batches", json={"model": "digits",
                                                "rows": rows(digits, slice(0, 6))})
        batch_id = r.json()["id"]
        view = (await api.get(f"/v1/batches/{batch_id}")).json()
        assert (view["status"], view["done"], view["rows_per_s"], view["eta_s"]) == \
            ("queued", 0, None, None)
        assert await results(api, batch_id) == []  # nothing finished, not following
        r = await api.delete(f"/v1/batches/{batch_id}")
        assert r.status_code == 200, r.text
        view = r.json()
        assert (view["status"], view["done"], view["cancelled"], view["failed"]) == \
            ("cancelled", 6, 6, 0)
        w = await anyio.to_thread.run_sync(start_worker, redis_env)
        later = await submit(api, rows(digits, 0), wait="20s")  # taken after the chunks
        assert later.json()["status"] == "succeeded"
        for index in range(3):
            await until(lambda i=index: log_says(w, f"job {chunk_id(batch_id, i)} model "
                                                    "digits: cancelled before it ran"),
                        f"the worker to skip chunk {index}")
        lines = await results(api, batch_id, follow="true")
        assert [line["ok"] for line in lines] == [False] * 6
        assert all("cancelled" in line["error"] for line in lines)
        assert (await api.get(f"/v1/batches/{batch_id}")).json() == view


# -- callbacks -------------------------------------------------------------------------------
class Receiver:
    """A local HTTP endpoint answering ``status`` and recording every POST."""

    def __init__(self, status: int):
        self.posts: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["content-length"]))
                posts.put((dict(self.headers), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[[int], Receiver]]:
    made: list[Receiver] = []

    def make(status: int) -> Receiver:
        made.append(Receiver(status))
        return made[-1]

    yield make
    for r in made:
        r.close()


async def test_callback_is_signed_and_recorded(redis_env, worker, receiver, digits):
    ok, broken = receiver(200), receiver(500)
    async with serve(redis_env, callback_max_attempts=2) as api:
        good = await api.post("/v1/models/digits/jobs", json={"inputs": rows(digits, 0),
                                                              "callback_url": ok.url})
        bad = await api.post("/v1/models/digits/jobs", json={"inputs": rows(digits, 1),
                                                             "callback_url": broken.url})
        headers, body = await anyio.to_thread.run_sync(lambda: ok.posts.get(timeout=30))
        assert signing.verify(SECRET, body, headers["X-Inferq-Signature"])
        assert not signing.verify("another-secret", body, headers["X-Inferq-Signature"])
        payload = json.loads(body)
        assert payload["event"] == "job.finished" and headers["X-Inferq-Event"] == "job.finished"
        assert payload["job"]["id"] == good.json()["id"]
        assert payload["job"]["status"] == "succeeded"
        assert_outputs(payload["job"]["outputs"], digits, slice(0, 1))

        async def callback_of(job_id: str, state: str) -> dict[str, Any] | None:
            cb = (await api.get(f"/v1/jobs/{job_id}")).json()["callback"]
            return cb if cb["state"] == state else None

        cb = await until(lambda: callback_of(good.json()["id"], "delivered"), "delivered")
        assert [(d["attempt"], d["status_code"]) for d in cb["deliveries"]] == [(1, 200)]
        cb = await until(lambda: callback_of(bad.json()["id"], "failed"), "given up")
        assert [(d["attempt"], d["error"]) for d in cb["deliveries"]] == \
            [(1, "HTTP 500"), (2, "HTTP 500")]
        assert broken.posts.qsize() == 2


async def test_callback_needs_a_signing_secret(redis_env, digits):
    async with serve(redis_env, callback_secret="") as api:
        r = await api.post("/v1/models/digits/jobs", json={
            "inputs": rows(digits, 0), "callback_url": "http://127.0.0.1:9/hook"})
        assert_problem(r, 422, "signing secret")
    assert depth(redis_env) == 0


# -- ops and models --------------------------------------------------------------------------
async def test_health_readiness_and_models(api):
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "result_store": "ok", "broker": "ok"}
    listed = (await api.get("/v1/models")).json()
    assert [m["name"] for m in listed] == ["digits"]
    one = (await api.get("/v1/models/digits")).json()
    assert one == listed[0]
    assert (one["version"], one["variant"], one["task"]) == (1, "fp32", "classification")
    assert one["inputs"][0]["name"] == "image" and one["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert [o["name"] for o in one["outputs"]] == ["probabilities", "label"]
    assert "fp32" in one["variants"]


async def test_metrics(worker, api, digits):
    job = await submit(api, rows(digits, 0), wait="20s")
    assert job.status_code == 200
    await submit(api, rows(digits, 0), wait="soon")  # a 422
    r = await api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    route = "/v1/models/{model}/jobs"
    assert value("inferq_api_requests_total", method="POST", route=route, status="200") == 1
    assert value("inferq_api_requests_total", method="POST", route=route, status="422") == 1
    assert value("inferq_jobs_total", model="digits", state="succeeded") == 1
    assert value("inferq_job_latency_seconds_count", model="digits") == 1
    assert value("inferq_queue_depth", model="digits") == 0
    assert ("inferq_queue_depth", (("model", "digits"),)) in samples
    await api.get(f"/v1/jobs/{job.json()['id']}")  # read again: counted once
    again = (await api.get("/metrics")).text
    assert 'inferq_jobs_total{model="digits",state="succeeded"} 1.0' in again


async def test_the_openapi_document_declares_auth_and_errors(api):
    doc = (await api.get("/openapi.json")).json()
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    from api.app import guarded

    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            needs_key = guarded(path)  # /v1/, and /v2/ but its health checks
            assert needs_key is (path.startswith("/v1/") or (
                path.startswith("/v2/") and "/health/" not in path)), path
            assert (op.get("security") == [{"apiKey": []}]) is needs_key, (method, path)
            assert {"401", "404", "413", "422", "429", "503"} <= set(op["responses"])
    assert "415" in doc["paths"]["/v1/batches"]["post"]["responses"]
    conflict = doc["paths"]["/v1/jobs/{job_id}"]["delete"]["responses"]["409"]
    assert conflict["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"}
