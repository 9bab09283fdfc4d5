"""The attacks of issue 14 against a real ``inferq api`` process and a real worker: each
gets a clear 4xx (or is refused at registration), never a 5xx, a traceback or a server
path, and the server goes on serving real jobs. No traffic leaves the machine: callback
targets are only resolved and refused, never called."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.test_api_e2e import AUTH, api_env

pytestmark = pytest.mark.integration

SSRF_URLS = ["http://100.100.100.200/latest/meta-data/", "http://100.64.0.1/",
             "http://[2002:7f00:1::]/", "http://[fec0::1]/", "http://169.254.169.254/",
             "http://[::ffff:127.0.0.1]/", f"http://{'a' * 64}.example.com/"]


@pytest.fixture
def server(redis_env, start_worker, start_api) -> Iterator[tuple[httpx.Client, dict]]:
    """A worker, an API process (body cap 256 KiB, no rate limit, callbacks to public
    addresses only: nothing here may be called back), a client with a key."""
    start_worker(redis_env)
    api = start_api(api_env(redis_env, INFERQ_API_MAX_BODY_BYTES=str(256 * 1024),
                            INFERQ_API_RATE_PER_S="0", INFERQ_CALLBACK_ALLOW_PRIVATE="false",
                            INFERQ_CALLBACK_MAX_ATTEMPTS="1"))
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30) as http:
        yield http, {"log": api.log, "env": redis_env}


def _clean_4xx(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    body = r.json()
    assert all(w in body["detail"] for w in words), body["detail"]
    return body


def _serves(http: httpx.Client, digits: dict) -> None:
    r = http.post("/v1/models/digits/jobs", params={"wait": "10s"},
                  json={"inputs": np.asarray(digits["x"][3]).reshape(-1).tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"]["label"] == [int(digits["label"][3])]


def test_callback_ssrf_targets_are_refused(server, digits):
    http, _ = server
    row = np.asarray(digits["x"][0]).reshape(-1).tolist()
    for url in SSRF_URLS:
        r = http.post("/v1/models/digits/jobs", json={"inputs": row, "callback_url": url})
        _clean_4xx(r, 422, "callback_url")
    _serves(http, digits)


def test_bodies_and_files_that_used_to_500(server, digits, model_repo):
    http, info = server
    deep = "[" * 100_000 + "]" * 100_000
    line = json.dumps(np.asarray(digits["x"][0]).reshape(-1).tolist())
    r = http.post("/v1/batches", params={"model": "digits"}, content=f"{line}\n{deep}\n",
                  headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text  # the deep line fails alone

    table = pa.table({"image": pa.array(np.asarray(digits["x"][:2000]).reshape(2000, 64)
                                        .tolist(), pa.list_(pa.float32()))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=500, compression="none")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2:len(data) // 2 + 2000] = b"\xff" * 2000
    r = http.post("/v1/batches", data={"model": "digits"},
                  files={"file": ("rows.parquet", bytes(data), "application/x-parquet")})
    body = _clean_4xx(r, 422, "the uploaded file")
    assert "api-uploads" not in body["detail"] and info["env"]["INFERQ_HOME"] not in r.text

    def streamed() -> Iterator[bytes]:
        for _ in range(100):  # 1 MiB in chunks, no Content-Length
            yield b" " * 10_240
    r = http.post("/v1/models/digits/jobs", content=streamed(),
                  headers={"content-type": "application/json"})
    _clean_4xx(r, 413, "INFERQ_API_MAX_BODY_BYTES")

    r = http.post("/v1/models/nope/jobs", json={"inputs": [0.0] * 64})
    assert str(model_repo) not in _clean_4xx(r, 404, "'nope'")["detail"]
    _serves(http, digits)


def test_no_key_is_401_before_the_body_and_metrics_stay_bounded(server, digits):
    http, _ = server
    for content in (b"{", b"[" * 200_000):
        r = httpx.post(http.base_url.join("/v1/models/digits/jobs"), content=content,
                       headers={"content-type": "application/json"}, timeout=30)
        _clean_4xx(r, 401, "API key")
    for i in range(20):  # invented: refused by the HTTP parser (400) or counted as "other"
        assert http.request(f"BREW{i}", "/v1/models").status_code < 500
    for method in ("PROPFIND", "PURGE", "MKCOL"):  # real methods the API does not serve
        assert http.request(method, "/healthz").status_code == 405
    text = http.get("/metrics").text
    assert "BREW" not in text and "PROPFIND" not in text and 'method="other"' in text
    _serves(http, digits)


def test_one_tenants_flood_does_not_429_another(redis_env, start_worker, start_api, digits):
    """Queue limit 20, each tenant's share 10: acme's flood fills the queue and then only
    acme waits; beta, under its share, is admitted; a batch is counted by its chunks."""
    api = start_api(api_env(redis_env, INFERQ_API_QUEUE_LIMIT="20", INFERQ_CHUNK_ROWS="10",
                            INFERQ_API_RATE_PER_S="0"))
    row = np.asarray(digits["x"][0]).reshape(-1).tolist()
    beta = {"Authorization": "Bearer key-b"}
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30) as http:
        r = http.post("/v1/batches", json={"model": "digits", "rows": [row] * 210})
        _clean_4xx(r, 413, "21 messages", "at most 200 rows")  # can never fit
        r = http.post("/v1/batches", json={"model": "digits", "rows": [row] * 200})
        assert r.status_code == 202, r.text  # 20 chunks: the queue is full
        flood = r.json()["id"]
        for _ in range(2):  # at once (this process's own count) and after a fresh read
            _clean_4xx(http.post("/v1/models/digits/jobs", json={"inputs": row}), 429,
                       "limit 20", "tenant 'acme' has 20", "share: 10")
            time.sleep(1.1)
        r = http.post("/v1/batches", json={"model": "digits", "rows": [row] * 30})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        jobs = [http.post("/v1/models/digits/jobs", json={"inputs": row}, headers=beta)
                for _ in range(7)]
        assert [j.status_code for j in jobs] == [202] * 7, jobs[-1].text
        r = http.post("/v1/batches", json={"model": "digits", "rows": [row] * 30},
                      headers=beta)
        assert r.status_code == 202, r.text  # 7 + 3 chunks: beta's whole share
        _clean_4xx(http.post("/v1/models/digits/jobs", json={"inputs": row}, headers=beta),
                   429, "tenant 'beta' has 10")

        start_worker(redis_env)  # everything admitted runs, and the shares free up
        for job in jobs:
            r = http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": "20s"},
                         headers=beta)
            assert r.json()["status"] == "succeeded", r.text
        deadline = time.monotonic() + 30
        while http.get(f"/v1/batches/{flood}").json()["status"] != "completed":
            assert time.monotonic() < deadline, "acme's batch did not finish"
            time.sleep(0.2)
        _serves(http, digits)
