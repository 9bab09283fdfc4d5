"""The audit log (``inferq.audit``): one line per submit, cancel and refused key, saying who
(tenant, key id, address) did what, and never any key material.

In process with ``httpx.ASGITransport`` (as tests/integration/test_api.py), and once end to
end: ``inferq api`` and ``inferq worker`` with ``INFERQ_LOG_FORMAT=json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import hash_key
from shared.logs import JsonFormatter
from shared.settings import load_settings
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

KEY_A, KEY_B = "iq_key-of-acme-0123456789", "iq_key-of-beta-9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
KEY_ID_A = hash_key(KEY_A)[:12]
IMAGE = [[[0.0] * 8 for _ in range(8)]]  # one digits row: 1x8x8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Records(logging.Handler):
    """Every record of ``inferq.audit``, kept as it is."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == event]


@pytest.fixture
def audit() -> Iterator[Records]:
    logger = logging.getLogger("inferq.audit")
    records, level = Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)  # as `inferq api` runs it (--log-level INFO)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


@contextlib.asynccontextmanager
async def serve(env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    values: dict[str, Any] = {k[len("INFERQ_"):].lower(): v for k, v in env.items()
                              if k.startswith("INFERQ_")}
    app = create_app(load_settings(**values, api_keys=f"acme:{KEY_A},beta:{KEY_B}"),
                     callbacks=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://inferq.test",
                                     headers=A) as client:
            yield client


@pytest.fixture
async def api(redis_env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(redis_env) as client:  # no worker: jobs stay queued, so cancellable
        yield client


def no_key_material(records: list[logging.LogRecord]) -> None:
    """Neither key, nor its full hash, in any message, field or JSON line."""
    formatter = JsonFormatter()
    for record in records:
        text = record.getMessage() + formatter.format(record) + repr(record.__dict__)
        for key in (KEY_A, KEY_B, "Bearer"):
            assert key not in text
            assert hash_key(key) not in text


def fields(record: logging.LogRecord) -> dict[str, Any]:
    line: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return line


async def test_a_job_submit_is_one_audit_line(api, audit) -> None:
    r = await api.post("/v1/models/digits/jobs", json={"inputs": [IMAGE, IMAGE]})
    assert r.status_code == 202, r.text
    [record] = audit.records
    assert record.levelno == logging.INFO and record.name == "inferq.audit"
    line = fields(record)
    assert {k: line[k] for k in ("event", "job_id", "tenant", "key_id", "model", "rows",
                                 "client")} == {
        "event": "submit", "job_id": r.json()["id"], "tenant": "acme", "key_id": KEY_ID_A,
        "model": "digits", "rows": 2, "client": "203.0.113.7"}
    assert line["message"] == (f"submit job={r.json()['id']} tenant=acme key={KEY_ID_A} "
                               "model=digits rows=2 client=203.0.113.7")
    assert line["logger"] == "inferq.audit" and line["level"] == "INFO"
    no_key_material(audit.records)


async def test_a_job_cancel_is_one_audit_line_and_a_refused_one_none(api, audit) -> None:
    job_id = (await api.post("/v1/models/digits/jobs", json={"inputs": [IMAGE]})).json()["id"]
    assert (await api.delete(f"/v1/jobs/{job_id}", headers=B)).status_code == 404  # not beta's
    assert audit.of("cancel") == []
    r = await api.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert (await api.delete(f"/v1/jobs/{job_id}")).status_code == 409  # already final
    [cancel] = [fields(r) for r in audit.of("cancel")]
    assert {k: cancel[k] for k in ("job_id", "tenant", "key_id", "model", "client")} == {
        "job_id": job_id, "tenant": "acme", "key_id": KEY_ID_A, "model": "digits",
        "client": "203.0.113.7"}
    assert [r.event for r in audit.records] == ["submit", "cancel"]  # type: ignore[attr-defined]
    no_key_material(audit.records)


async def test_a_batch_submit_and_cancel_are_audited(api, audit) -> None:
    r = await api.post("/v1/batches", json={"model": "digits", "rows": [IMAGE] * 5})
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    assert (await api.delete(f"/v1/batches/{batch_id}")).status_code == 200
    submit, cancel = (fields(r) for r in audit.records)
    assert {k: submit[k] for k in ("event", "batch_id", "tenant", "key_id", "model",
                                   "rows", "refused", "client")} == {
        "event": "submit", "batch_id": batch_id, "tenant": "acme", "key_id": KEY_ID_A,
        "model": "digits", "rows": 5, "refused": 0, "client": "203.0.113.7"}
    assert {k: cancel[k] for k in ("event", "batch_id", "tenant", "key_id", "rows")} == {
        "event": "cancel", "batch_id": batch_id, "tenant": "acme", "key_id": KEY_ID_A,
        "rows": 5}
    assert "job_id" not in submit
    no_key_material(audit.records)


async def test_a_refused_key_is_one_audit_line_without_the_key(api, audit) -> None:
    wrong = "iq_a-guessed-key-that-is-not-real"
    r = await api.get("/v1/jobs/abc", headers={"Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401
    r = await api.post("/v1/models/digits/jobs", json={"inputs": [IMAGE]},
                       headers={"Authorization": ""})
    assert r.status_code == 401
    unknown, missing = (fields(r) for r in audit.records)
    assert {k: unknown[k] for k in ("event", "reason", "method", "path", "client")} == {
        "event": "auth_refused", "reason": "unknown_key", "method": "GET",
        "path": "/v1/jobs/abc", "client": "203.0.113.7"}
    assert (missing["reason"], missing["method"]) == ("no_key", "POST")
    assert "tenant" not in unknown and "key_id" not in unknown
    assert audit.of("submit") == []
    for record in audit.records:
        assert wrong not in fields(record).__repr__() and wrong not in record.getMessage()
        assert hash_key(wrong)[:12] not in repr(record.__dict__)
    no_key_material(audit.records)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def test_served_with_json_logs_every_log_line_is_json(redis_env, start_api, start_worker
                                                       ) -> None:
    """``inferq api`` and ``inferq worker`` with INFERQ_LOG_FORMAT=json: uvicorn's lines,
    Celery's and the audit lines are all JSON objects, one a line."""
    env = {**redis_env, "INFERQ_LOG_FORMAT": "json", "INFERQ_API_KEYS": f"acme:{KEY_A}"}
    worker = start_worker(env)
    server = start_api(env)
    with httpx.Client(base_url=server.url, headers=A, timeout=30) as http:
        r = http.post("/v1/models/digits/jobs", params={"wait": "20s"},
                      json={"inputs": [IMAGE]})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        assert http.get("/v1/jobs/x", headers={"Authorization": "Bearer nope"}
                        ).status_code == 401
    # the log file is written by another process: read until the lines are in
    api_log = wait_until(lambda: (text := server.log.read_text()).count('"inferq.audit"') >= 2
                         and text, 10, "two audit lines in the API log")
    lines = [line for line in api_log.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), api_log[-3000:]
    parsed = json_lines(api_log)
    assert any(p["logger"].startswith("uvicorn") for p in parsed)  # uvicorn's own loggers
    audit = [p for p in parsed if p["logger"] == "inferq.audit"]
    assert [p["event"] for p in audit] == ["submit", "auth_refused"], audit
    assert audit[0]["tenant"] == "acme" and audit[0]["key_id"] == KEY_ID_A
    assert audit[0]["client"] == "127.0.0.1" and audit[0]["rows"] == 1
    assert KEY_A not in api_log and "nope" not in api_log
    for p in parsed:
        assert {"ts", "level", "logger", "message"} <= set(p)
    worker_log = worker.log.read_text()
    # stdout carries Celery's banner; every log line (stderr) is JSON, none plain text
    assert not [line for line in worker_log.splitlines() if TEXT_LINE.match(line)]
    ready = [p for p in json_lines(worker_log) if p["message"].endswith(" ready.")]
    assert ready and ready[0]["logger"] == "celery.apps.worker"
