"""Requests an attacker would send (issue 14, first part): each gets a clear 4xx, never a
500 or a server path, and none grows ``/metrics``."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.test_api import assert_problem, depth, rows, serve

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_streamed_body_over_the_limit_gets_413_on_the_job_route(redis_env, digits):
    """No Content-Length, 100 KB in chunks: the job route used to answer 400 (FastAPI
    turned the limit's exception into 'error parsing the body')."""
    body = json.dumps({"inputs": rows(digits, 0), "pad": "x" * 100_000}).encode()

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    async with serve(redis_env, api_max_body_bytes=8192) as api:
        r = await api.post("/v1/models/digits/jobs", content=streamed(),
                           headers={"content-type": "application/json"})
        assert_problem(r, 413, "INFERQ_API_MAX_BODY_BYTES")
    assert depth(redis_env) == 0


async def test_invented_methods_do_not_grow_metrics(redis_env):
    async with serve(redis_env) as api:
        for i in range(20):
            r = await api.request(f"BREW{i}", "/v1/models")
            assert 400 <= r.status_code < 500
        text = (await api.get("/metrics")).text
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("inferq_api_requests_total{")}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods and not any("BREW" in line for line in text.splitlines())


async def test_an_ndjson_line_nested_100000_deep_fails_alone(redis_env, digits):
    deep = "[" * 100_000 + "]" * 100_000
    body = (json.dumps(rows(digits, 0)) + "\n" + deep + "\n").encode()
    async with serve(redis_env) as api:
        r = await api.post("/v1/batches", params={"model": "digits"}, content=body,
                           headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    assert r.json()["total"] == 2


async def test_a_corrupted_parquet_upload_gets_422_without_a_server_path(redis_env, digits,
                                                                         tmp_path):
    """A valid footer and a corrupted middle: 422 naming where reading stopped."""
    table = pa.table({"image": pa.array(
        np.asarray(digits["x"][:2000]).reshape(2000, 64).tolist(), pa.list_(pa.float32()))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=500, compression="none")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle:middle + 2000] = b"\xff" * 2000
    async with serve(redis_env, chunk_rows=256) as api:
        r = await api.post("/v1/batches", data={"model": "digits"},
                           files={"file": ("rows.parquet", bytes(data), "application/x-parquet")})
    problem = assert_problem(r, 422, "the uploaded file")
    assert "cannot be read" in problem["detail"] or "not a readable" in problem["detail"]
    assert str(tmp_path) not in r.text and "api-uploads" not in r.text
    assert "/" not in problem["detail"].split(":")[0]


async def test_an_unknown_model_is_named_without_the_repository_path(redis_env, model_repo):
    async with serve(redis_env) as api:
        r = await api.post("/v1/models/nope/jobs", json={"inputs": [0.0] * 64})
    problem = assert_problem(r, 404, "'nope'")
    assert str(model_repo) not in problem["detail"]
    assert "the model repository" in problem["detail"]


async def test_no_key_gets_401_before_the_body_is_read(redis_env):
    """A malformed or huge body without a key: 401, not a 422 or seconds of parsing."""
    read = {"bytes": 0}

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            read["bytes"] += 1 << 20
            yield b"[" * (1 << 20)

    async with serve(redis_env) as api:
        for content in (b"{", body()):
            r = await api.post("/v1/models/digits/jobs", content=content,
                               headers={"Authorization": "", "content-type":
                                        "application/json"})
            assert_problem(r, 401, "API key")
        assert read["bytes"] <= 2 << 20  # the 64 MiB body was not read
        r = await api.post("/v1/batches", content=b"{", headers={
            "Authorization": "Bearer wrong", "content-type": "application/json"})
        assert_problem(r, 401, "API key")


async def test_an_api_on_the_model_catalog_names_no_store_address(redis_env, model_repo,
                                                                   tmp_path):
    """An API with no model folder validates against the catalog in the result store;
    its errors name neither the folder nor the store's address."""
    import redis as redis_client

    from shared import catalog
    from shared.repository import ModelRepository

    store = redis_client.Redis.from_url(redis_env["INFERQ_RESULT_BACKEND"])
    catalog.publish(store, catalog.keys.catalog(redis_env["INFERQ_QUEUE_PREFIX"]),
                    ModelRepository(model_repo), ["digits"])
    env = {**redis_env, "INFERQ_MODEL_REPO": str(tmp_path / "none")}
    async with serve(env, model_source="store") as api:
        listed = await api.get("/v1/models")
        bad = await api.post("/v1/models/digits/jobs", json={"inputs": [0.0] * 3})
        unknown = await api.post("/v1/models/nope/jobs", json={"inputs": [0.0] * 64})
    assert listed.status_code == 200 and "digits" in listed.text
    assert bad.status_code == 422 and "image" in bad.text
    problem = assert_problem(unknown, 404, "'nope'")
    assert "redis://" not in unknown.text and "6379" not in unknown.text
    assert "the result store" in problem["detail"] and "holds: digits" in problem["detail"]
