"""The HTTP results API end to end: a real ``inferq api`` (uvicorn) process, a real worker
process, real Redis (and RabbitMQ for the throughput test). Nothing is mocked.

1. 1,000 single-row jobs over HTTP, 64 in flight; results equal in-process ORT.
2. A 20,000-row batch streamed back (``?follow=true``) in order while it still runs.
3. Signed webhooks, retried after a 500, for a job and for a batch.
4. An outage of a test-owned Redis: 503 with a clean message, fast, never the password;
   back to 202 once Redis returns. Also the broker alone going away: 503 naming the
   broker, and no record left of a job that was never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shared import signing
from tests.conftest import (
    client_for,
    free_port,
    restartable_port,
    stopped_after,
    wait_until,
)

pytestmark = pytest.mark.integration

KEYS = "acme:key-a,beta:key-b"
SECRET = "cb-secret-" + uuid.uuid4().hex
AUTH = {"Authorization": "Bearer key-a"}
FINAL = {"succeeded", "failed", "cancelled"}
# Uvicorn closes a keep-alive connection idle for 5 s, httpx's default expiry is also 5 s:
# a request sent on such a connection as the server closes it fails (ReadError). Retire
# idle connections well before the server does.
LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=1.0)


def api_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**env, "INFERQ_API_KEYS": KEYS, "INFERQ_CALLBACK_SECRET": SECRET,
            "INFERQ_CALLBACK_ALLOW_PRIVATE": "true", **extra}


# -- 1. many single-row jobs -------------------------------------------------------------
async def _run_jobs(url: str, x: np.ndarray, in_flight: int
                    ) -> tuple[list[dict[str, Any]], list[float], float]:
    sem = asyncio.Semaphore(in_flight)
    views: list[dict[str, Any]] = [{} for _ in range(len(x))]
    latency = [0.0] * len(x)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30, limits=LIMITS) as http:
        async def one(i: int) -> None:
            async with sem:
                started = time.perf_counter()
                r = await http.post("/v1/models/digits/jobs", json={"inputs": x[i].tolist()})
                assert r.status_code == 202, r.text
                assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
                location = r.json()["location"]
                for _ in range(10):  # 10 long polls of 5 s at most
                    r = await http.get(location, params={"wait": "5s"})
                    assert r.status_code == 200, r.text
                    if r.json()["status"] in FINAL:
                        break
                latency[i] = time.perf_counter() - started
                views[i] = r.json()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(x))))
        elapsed = time.perf_counter() - started
    return views, latency, elapsed


@pytest.mark.timeout(240)
def test_1000_single_row_jobs_over_http(broker_env, start_worker, start_api, digits):
    n = 1_000
    start_worker(broker_env)
    # 1,000 POSTs plus their polls exceed the default 200 requests/s of one tenant.
    api = start_api(api_env(broker_env, INFERQ_API_RATE_PER_S="0"))
    views, latency, elapsed = asyncio.run(asyncio.wait_for(
        _run_jobs(api.url, digits["x"][:n], in_flight=64), timeout=120))

    assert [v["status"] for v in views] == ["succeeded"] * n
    labels = np.array([v["outputs"]["label"][0] for v in views])
    probs = np.array([v["outputs"]["probabilities"][0] for v in views], dtype=np.float32)
    np.testing.assert_array_equal(labels, digits["label"][:n])
    np.testing.assert_allclose(probs, digits["probabilities"][:n], rtol=1e-5, atol=1e-6)
    assert all(v["model"] == "digits" and v["errors"] == [] for v in views)
    batched = max(max(v["timings"]["batch_rows"]) for v in views)
    p50, p99 = np.percentile(latency, [50, 99])
    broker = broker_env["INFERQ_BROKER_URL"].split(":")[0]
    print(f"\n[{broker}] {n} single-row jobs over HTTP, 64 in flight: {elapsed:.1f} s, "
          f"{n / elapsed:.0f} jobs/s; latency p50 {p50 * 1000:.0f} ms, p99 "
          f"{p99 * 1000:.0f} ms; largest model call {batched} rows")


# -- 2. a big batch streamed while it runs -------------------------------------------------
@pytest.mark.timeout(180)
def test_batch_streams_in_order_while_running(redis_env, start_worker, start_api, digits):
    total = 20_000
    x = np.concatenate([digits["x"], digits["x"]])[:total]
    labels = np.concatenate([digits["label"], digits["label"]])[:total]
    # 20 ms per model call of at most 100 rows: the batch takes 4 s or more of model calls.
    start_worker({**redis_env, "INFERQ_FAULT_INJECTION": "delay_ms=20",
                  "INFERQ_MAX_BATCH_ROWS": "100"}, "--concurrency", "8")
    api = start_api(api_env(redis_env, INFERQ_CHUNK_ROWS="500"))
    body = "".join(json.dumps(row) + "\n" for row in x.reshape(total, -1).tolist()).encode()

    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30, limits=LIMITS) as http:
        r = http.post("/v1/batches", params={"model": "digits"}, content=body,
                      headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 202, r.text
        batch = r.json()
        assert batch["total"] == total and batch["status"] in ("queued", "running")
        assert r.headers["location"] == f"/v1/batches/{batch['id']}"

        rows: list[int] = []
        got = np.full(total, -1, dtype=np.int64)
        mid: dict[str, Any] = {}
        started = first_at = time.monotonic()
        deadline = started + 120
        with http.stream("GET", batch["results"], params={"follow": "true"}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("application/x-ndjson")
            for line in stream.iter_lines():
                if not line:
                    continue
                assert time.monotonic() < deadline, "the stream ran past 120 s"
                item = json.loads(line)
                assert item["ok"], item
                rows.append(item["row"])
                got[item["row"]] = item["outputs"]["label"]
                if len(rows) == 1:
                    # The first line is in: the batch must still be running.
                    first_at = time.monotonic()
                    mid = http.get(f"/v1/batches/{batch['id']}").json()
        ended = time.monotonic()
        final = http.get(f"/v1/batches/{batch['id']}").json()
        # Without follow, from an offset: the tail of the finished batch.
        tail = http.get(batch["results"], params={"offset": total - 10}).text.splitlines()

    assert mid["status"] == "running", mid
    assert 0 < mid["done"] < total, mid
    assert rows == list(range(total)), "every row exactly once, in input order"
    np.testing.assert_array_equal(got, labels)
    assert final["status"] == "completed" and final["done"] == total, final
    assert final["failed"] == final["cancelled"] == 0 and final["eta_s"] == 0.0
    assert [json.loads(line)["row"] for line in tail] == list(range(total - 10, total))
    print(f"\nbatch of {total} rows (20 ms per model call): first line after "
          f"{first_at - started:.2f} s with {mid['done']}/{total} rows done; last line "
          f"after {ended - started:.2f} s; {final['rows_per_s']:.0f} rows/s")


# -- 3. signed webhooks, retried ----------------------------------------------------------
class Receiver:
    """A local webhook receiver: 500 to the first POST on each path, 200 afterwards."""

    def __init__(self) -> None:
        self.hits: dict[str, list[tuple[dict[str, str], bytes]]] = {}
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.changed:
                    seen = receiver.hits.setdefault(self.path, [])
                    seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    code = 500 if len(seen) == 1 else 200
                    receiver.changed.notify_all()
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, path: str, count: int, timeout: float
             ) -> list[tuple[dict[str, str], bytes]]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.hits.get(path, [])) >= count,
                                         timeout):
                raise TimeoutError(f"{path}: {len(self.hits.get(path, []))} of {count} "
                                   f"deliveries in {timeout} s")
            return list(self.hits[path])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _check_signed(headers: dict[str, str], body: bytes, event: str, member: str,
                  attempt: int) -> dict[str, Any]:
    assert signing.verify(SECRET, body, headers["x-inferq-signature"])
    assert not signing.verify("another secret", body, headers["x-inferq-signature"])
    assert not signing.verify(SECRET, body + b" ", headers["x-inferq-signature"])
    assert headers["x-inferq-event"] == event
    assert headers["x-inferq-delivery"] == f"{member}:{attempt}"
    assert headers["content-type"] == "application/json"
    payload: dict[str, Any] = json.loads(body)
    assert payload["event"] == event
    return payload


def _delivered(http: httpx.Client, location: str) -> dict[str, Any] | None:
    view: dict[str, Any] = http.get(location).json()
    return view if view["callback"]["state"] == "delivered" else None


@pytest.mark.timeout(120)
def test_webhooks_signed_and_retried(redis_env, start_worker, start_api, receiver, digits):
    start_worker(redis_env)
    api = start_api(api_env(redis_env))
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30, limits=LIMITS) as http:
        job_hook = receiver.url + "/hooks/job"
        r = http.post("/v1/models/digits/jobs",
                      json={"inputs": digits["x"][7].tolist(), "callback_url": job_hook})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        rows = 50
        batch_hook = receiver.url + "/hooks/batch"
        r = http.post("/v1/batches", json={"model": "digits", "callback_url": batch_hook,
                                           "rows": digits["x"][:rows].tolist()})
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]

        # Job: a 500, then (after a backoff of 0.5-1 s) a 200.
        (h1, b1), (h2, b2) = receiver.wait("/hooks/job", 2, timeout=30)
        first = _check_signed(h1, b1, "job.finished", f"job:{job_id}", 1)
        second = _check_signed(h2, b2, "job.finished", f"job:{job_id}", 2)
        for payload in (first, second):
            job = payload["job"]
            assert job["id"] == job_id and job["status"] == "succeeded"
            assert job["outputs"]["label"] == [int(digits["label"][7])]
            np.testing.assert_allclose(job["outputs"]["probabilities"][0],
                                       digits["probabilities"][7], rtol=1e-5, atol=1e-6)
        assert second["job"]["callback"]["deliveries"][0]["status_code"] == 500
        view = wait_until(lambda: _delivered(http, f"/v1/jobs/{job_id}"), 10,
                          "the job's callback recorded as delivered")
        cb = view["callback"]
        assert cb["url"] == job_hook
        assert [(d["attempt"], d["status_code"]) for d in cb["deliveries"]] == [(1, 500),
                                                                                 (2, 200)]
        assert cb["deliveries"][0]["error"] == "HTTP 500" and cb["deliveries"][1]["error"] is None
        assert cb["deliveries"][1]["at"] - cb["deliveries"][0]["at"] >= 0.4  # the backoff
        # The body is the final job view (its callback part as it was when sent).
        assert {k: v for k, v in second["job"].items() if k != "callback"} == \
            {k: v for k, v in view.items() if k != "callback"}

        # Batch: the same, event batch.finished with the completed batch view.
        (h1, b1), (h2, b2) = receiver.wait("/hooks/batch", 2, timeout=30)
        _check_signed(h1, b1, "batch.finished", f"batch:{batch_id}", 1)
        payload = _check_signed(h2, b2, "batch.finished", f"batch:{batch_id}", 2)
        sent = payload["batch"]
        assert sent["id"] == batch_id and sent["status"] == "completed"
        assert sent["total"] == sent["done"] == rows and sent["failed"] == 0
        view = wait_until(lambda: _delivered(http, f"/v1/batches/{batch_id}"), 10,
                          "the batch's callback recorded as delivered")
        assert [(d["attempt"], d["status_code"]) for d in view["callback"]["deliveries"]] \
            == [(1, 500), (2, 200)]
        lines = [json.loads(line) for line in
                 http.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
        assert [line["outputs"]["label"] for line in lines] == digits["label"][:rows].tolist()

        # Another tenant sees neither.
        other = {"Authorization": "Bearer key-b"}
        assert http.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
        assert http.get(f"/v1/batches/{batch_id}", headers=other).status_code == 404
    assert len(receiver.hits["/hooks/job"]) == 2 and len(receiver.hits["/hooks/batch"]) == 2


@pytest.mark.timeout(120)
def test_expired_and_all_rows_failed_jobs_get_their_callback_and_one_status(
        redis_env, start_worker, start_api, receiver, digits):
    """A job whose deadline passed before any worker took it ends ``expired`` and its
    callback is delivered; a job whose only row failed in the worker is ``failed``, the
    same through the API, its callback and the SDK."""
    api = start_api(api_env(redis_env))
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30, limits=LIMITS) as http:
        late = http.post("/v1/models/digits/jobs", json={
            "inputs": digits["x"][3].tolist(), "expires_in": 0.2,
            "callback_url": receiver.url + "/hooks/late"})
        assert late.status_code == 202, late.text
        start_worker(  # starting takes seconds: the deadline has passed when it consumes
            {**redis_env, "INFERQ_FAULT_INJECTION": "raise_on=-7"})
        bad_row = digits["x"][4].copy()
        bad_row[0, 0, 0] = -7  # valid input that makes the model raise
        bad = http.post("/v1/models/digits/jobs", json={
            "inputs": bad_row.tolist(), "callback_url": receiver.url + "/hooks/bad"})
        assert bad.status_code == 202, bad.text

        for path, job_id, status in (("/hooks/late", late.json()["id"], "expired"),
                                     ("/hooks/bad", bad.json()["id"], "failed")):
            (_, body), (_, again) = receiver.wait(path, 2, timeout=30)  # a 500, then a 200
            sent = json.loads(again)["job"]
            assert (sent["id"], sent["status"]) == (job_id, status), sent
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == status
            assert client_for(redis_env).get(job_id).status.value == status
        assert "injected fault" in sent["error"]


# -- 4. a Redis outage -----------------------------------------------------------------------
class OwnRedis:
    """A redis-server subprocess owned by the test (password, no persistence), by PID."""

    def __init__(self, port: int, password: str, log: Path):
        self.port, self.password, self.log = port, password, log
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--requirepass", self.password, "--save", "", "--appendonly", "no",
                 "--daemonize", "no"], stdout=out, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=1)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(redis.ConnectionError):
                return bool(client.ping())
            return False

        try:
            wait_until(up, 15, f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """``own_redis()`` -> a started OwnRedis on a free port; all stopped after the test."""
    with stopped_after() as servers:

        def start() -> OwnRedis:
            server = OwnRedis(restartable_port(), "pw-" + uuid.uuid4().hex,
                              tmp_path / f"redis-{len(servers)}.log")
            servers.append(server)
            server.start()
            return server

        yield start


def _outage_env(broker: str, store: str, model_repo: Path, home: Path, **extra: str
                ) -> dict[str, str]:
    return api_env({"INFERQ_BROKER_URL": broker, "INFERQ_RESULT_BACKEND": store,
                    "INFERQ_MODEL_REPO": str(model_repo), "INFERQ_HOME": str(home),
                    "INFERQ_QUEUE_PREFIX": f"t{uuid.uuid4().hex[:10]}."}, **extra)


class Recorder:
    """An HTTP client that keeps every response body (to look for secrets in them)."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=30, limits=LIMITS)
        self.bodies: list[str] = []
        self.slowest = 0.0

    def __call__(self, method: str, path: str, **kw: Any) -> httpx.Response:
        started = time.monotonic()
        r = self.http.request(method, path, **kw)
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.bodies.append(r.text)
        return r

    def close(self) -> None:
        self.http.close()


def _assert_clean_503(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "5"
    detail = r.json()["detail"]
    assert all(w in detail for w in ("unavailable", "retry later", *words)), detail
    assert "Traceback" not in r.text and 'File "' not in r.text


def _assert_no_secret(secret: str, call: Recorder, log: Path) -> None:
    for text in call.bodies:
        assert secret not in text
        assert "Traceback" not in text
    assert secret not in log.read_text(errors="replace"), "a Redis password is in the log"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rate", ["200", "0"], ids=["rate-limited", "unlimited"])
def test_redis_outage_answers_503_without_secrets(rate, own_redis, model_repo, tmp_path,
                                                  start_api, digits):
    """Broker and result store are one Redis, which goes away and comes back. With a rate
    limit the first Redis call is the key's rate window; without one, requests get as far
    as the queue depth, the job record and the publish."""
    server = own_redis()
    api = start_api(_outage_env(server.url, server.url, model_repo, tmp_path / "home",
                                INFERQ_API_RATE_PER_S=rate))
    row = {"inputs": digits["x"][0].tolist()}
    call = Recorder(api.url)
    try:
        r = call("GET", "/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ok", "result_store": "ok", "broker": "ok"}
        r = call("POST", "/v1/models/digits/jobs", json=row)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert call("GET", f"/v1/jobs/{job_id}").json()["status"] == "queued"

        server.stop()
        r = call("GET", "/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "unavailable"
        assert r.json()["result_store"].startswith("unavailable")
        assert r.json()["broker"].startswith("unavailable")

        _assert_clean_503(call("POST", "/v1/models/digits/jobs", json=row))
        _assert_clean_503(call("GET", f"/v1/jobs/{job_id}"))
        _assert_clean_503(call("GET", f"/v1/jobs/{job_id}", params={"wait": "1s"}))
        _assert_clean_503(call("POST", "/v1/batches",
                               json={"model": "digits", "rows": [row["inputs"]]}))
        assert call("GET", "/healthz").status_code == 200
        # Fail fast: no answer waits on retries (kombu's default pause alone is 2 s).
        assert call.slowest < 1.8, f"an answer took {call.slowest:.1f} s during the outage"

        # Redis returns (empty: no persistence) on the same port: new work is accepted.
        server.start()
        r = call("POST", "/v1/models/digits/jobs", json=row)
        assert r.status_code == 202, r.text
        assert call("GET", r.json()["location"]).json()["status"] == "queued"
        assert call("GET", "/readyz").status_code == 200
    finally:
        call.close()
    _assert_no_secret(server.password, call, api.log)
    assert "result store error" in api.log.read_text()  # logged, scrubbed


@pytest.mark.timeout(120)
def test_broker_outage_enqueues_nothing(own_redis, model_repo, tmp_path, start_api, digits):
    """The broker (its own Redis) goes away while the result store stays: 503 naming the
    broker, and no record is left of a job that was never sent."""
    import redis

    store, broker = own_redis(), own_redis()
    api = start_api(_outage_env(broker.url, store.url, model_repo, tmp_path / "home",
                                INFERQ_API_RATE_PER_S="0"))
    row = {"inputs": digits["x"][0].tolist()}
    call = Recorder(api.url)
    records = redis.Redis.from_url(store.url)
    try:
        # Jobs for longer than the queue depth is cached (1 s): the API then holds a broker
        # connection that has seen the queue, as it does in steady use.
        window = time.monotonic() + 1.2
        while time.monotonic() < window:
            r = call("POST", "/v1/models/digits/jobs", json=row)
            assert r.status_code == 202, r.text
        keys_before = set(records.keys())

        broker.stop()
        r = call("GET", "/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["result_store"] == "ok"
        assert r.json()["broker"].startswith("unavailable")
        # POSTs for longer than the queue depth is cached (1 s), so that some fail on
        # publishing and some on reading the depth: each names the broker, not the store.
        window = time.monotonic() + 1.5
        tries = 0
        while time.monotonic() < window or tries < 3:
            tries += 1
            r = call("POST", "/v1/models/digits/jobs", json=row)
            _assert_clean_503(r, "broker")
        assert set(records.keys()) == keys_before, "a job that was never sent left records"
        assert call.slowest < 1.8, f"an answer took {call.slowest:.1f} s during the outage"

        broker.start()
        r = call("POST", "/v1/models/digits/jobs", json=row)
        assert r.status_code == 202, r.text
        assert call("GET", "/readyz").status_code == 200
    finally:
        call.close()
        records.close()
    _assert_no_secret(broker.password, call, api.log)
    _assert_no_secret(store.password, call, api.log)
