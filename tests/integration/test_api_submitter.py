"""The API's event-loop submitter (api/submitter.py) against real Redis: concurrent
requests share messages that a real worker runs; a refused job leaves nothing behind; a
server that lost the script still submits; an unreachable Redis is a 503 naming the job,
within the publish retries."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any

import anyio
import pytest
from celery import Celery

import api.submitter as submitter_module
from api.context import FAST_PUBLISH
from api.store import ApiStore
from api.submitter import LoopSubmitter, Pending, Quota
from producer.client import Client
from shared.errors import Unavailable
from shared.queues import queue_name
from shared.repository import parse_model_ref
from tests.integration.test_api import assert_outputs, rows, serve, settings_for

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _submitter(env: dict[str, str], **overrides: Any) -> LoopSubmitter:
    settings = settings_for(env, **overrides)
    client = Client(settings)
    store = ApiStore(settings, Celery(backend=settings.effective_result_backend()))
    assert client.direct is not None and LoopSubmitter.usable(client)
    return LoopSubmitter(store, client, client.direct, "test-replies", FAST_PUBLISH)


def _job(inputs: Any, quota: Quota | None = None, callback: bool = False) -> Pending:
    job_id = uuid.uuid4().hex
    record = {"tenant": "acme", "model": "digits", "rows": 1, "submitted_at": time.time()}
    return Pending(job_id, parse_model_ref("digits"), "normal", {"image": inputs}, record,
                   callback, quota)


async def test_concurrent_requests_share_messages_that_a_worker_runs(redis_env, digits,
                                                                     start_worker):
    start_worker(redis_env)
    async with serve(redis_env) as api:
        app_api = api._transport.app.state.api  # type: ignore[attr-defined]
        assert app_api.submitter is not None  # a Redis broker that is the result store
        with anyio.fail_after(60):
            answers = await asyncio.gather(*(
                api.post("/v1/models/digits/jobs", params={"wait": "30s"},
                         json={"inputs": rows(digits, [i])}) for i in range(40)))
        for i, r in enumerate(answers):
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "succeeded"
            assert_outputs(r.json()["outputs"], digits, [i])
        sent = app_api.submitter
        print(f"\n40 concurrent requests in {sent.messages} messages")
        assert sent.jobs == 40 and sent.messages < 40


async def test_a_refused_job_leaves_no_record_result_callback_or_message(redis_env, digits):
    sub = _submitter(redis_env)
    store, r = sub.store, sub.store.redis
    queue = queue_name(sub.sender.settings, "digits")
    quota = Quota("acme", share=1, limit=1)
    first, second = _job(rows(digits, [0]), quota), _job(rows(digits, [1]), quota, True)
    try:
        assert await sub.submit(first) == (True, 0, 0)
        assert store.job_record(first.job_id)["tenant"] == "acme"
        assert r.exists(store.meta_key(first.job_id)) and r.llen(queue) == 1
        # Over its share (1) with the queue at its limit (1 message): refused whole.
        assert await sub.submit(second) == (False, 1, 1)
        assert not r.exists(store.job_key(second.job_id), store.meta_key(second.job_id))
        assert r.zscore(store.callbacks_key, f"job:{second.job_id}") is None
        assert r.zscore(store.open_key("digits", "acme"), second.job_id) is None
        assert r.llen(queue) == 1
    finally:
        for job in (first, second):
            store.drop_job(job.job_id)
        store.forget_open("digits", "acme", [first.job_id, second.job_id])
        r.delete(queue)
        await store.close_async()


async def test_jobs_of_one_commit_are_admitted_each_on_its_own(redis_env, digits):
    """Three jobs at once, the tenant's share 2 and the queue full: two are admitted (in a
    message of their own), the third is refused and leaves nothing."""
    sub = _submitter(redis_env)
    store, r = sub.store, sub.store.redis
    queue = queue_name(sub.sender.settings, "digits")
    quota = Quota("acme", share=2, limit=0)
    jobs = [_job(rows(digits, [i]), quota) for i in range(3)]
    try:
        verdicts = await asyncio.gather(*(sub.submit(j) for j in jobs))
        assert sorted(verdicts) == [(False, 2, 0), (True, 0, 0), (True, 1, 0)]
        kept = [j for j, v in zip(jobs, verdicts, strict=True) if v[0]]
        refused = next(j for j, v in zip(jobs, verdicts, strict=True) if not v[0])
        for job in kept:
            assert store.job_record(job.job_id)["tenant"] == "acme"
        assert not r.exists(store.job_key(refused.job_id), store.meta_key(refused.job_id))
        assert r.llen(queue) == 1 and sub.messages == 1 and sub.jobs == 2
        assert r.zscore(store.open_key("digits", "acme"), refused.job_id) is None
    finally:
        for job in jobs:
            store.drop_job(job.job_id)
        store.forget_open("digits", "acme", [j.job_id for j in jobs])
        r.delete(queue)
        await store.close_async()


async def test_the_verdict_is_heard_even_when_the_request_went_away(redis_env, digits):
    """A request cancelled while its job is being committed: the job is still recorded
    and queued, and the submitter's ``then`` (the API's audit line) still hears it."""
    sub = _submitter(redis_env)
    heard: list[Any] = []
    job = _job(rows(digits, [0]))
    waiting = asyncio.create_task(sub.submit(job, heard.append))
    await asyncio.sleep(0)  # it has joined the pending submits
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    try:
        with anyio.fail_after(10):
            while not heard:
                await asyncio.sleep(0.01)
        assert heard == [(True, 0, 0)]
        assert sub.store.job_record(job.job_id)["tenant"] == "acme"
    finally:
        sub.store.drop_job(job.job_id)
        sub.store.redis.delete(queue_name(sub.sender.settings, "digits"))
        await sub.store.close_async()


async def test_a_commit_sent_again_after_a_lost_reply_writes_nothing_twice(redis_env,
                                                                           digits):
    """A retry of a commit that ran (its reply lost on the way back) finds its records:
    no second message, no second admission, the verdict is still 'admitted'."""
    sub = _submitter(redis_env)
    store, r = sub.store, sub.store.redis
    queue = queue_name(sub.sender.settings, "digits")
    job = _job(rows(digits, [0]), Quota("acme", share=1, limit=1))
    calls = sub._calls([[job]])
    try:
        first, again = await sub._run(calls), await sub._run(calls)
        # all admitted, the depth (0, then its own message), the job: admitted, 0 open before
        assert first == [[1, 0, 1, 0]] and again == [[1, 1, 1, 0]]
        assert r.llen(queue) == 1 and r.zcard(store.open_key("digits", "acme")) == 1
    finally:
        store.drop_job(job.job_id)
        store.forget_open("digits", "acme", [job.job_id])
        r.delete(queue)
        await store.close_async()


async def test_a_server_that_lost_the_script_still_submits(redis_env, digits, monkeypatch):
    """EVALSHA of a script the server never saw answers NOSCRIPT, as after a restart."""
    fresh = f"{submitter_module.SUBMIT}\n-- {uuid.uuid4().hex}"
    monkeypatch.setattr(submitter_module, "SUBMIT", fresh)
    monkeypatch.setattr(submitter_module, "_SHA", hashlib.sha1(fresh.encode()).hexdigest())
    sub = _submitter(redis_env)
    job = _job(rows(digits, [0]))
    try:
        assert await sub.submit(job) == (True, 0, 0)
        assert sub.store.job_record(job.job_id)["model"] == "digits"
    finally:
        sub.store.drop_job(job.job_id)
        sub.store.redis.delete(queue_name(sub.sender.settings, "digits"))
        await sub.store.close_async()


async def test_an_unreachable_redis_is_unavailable_naming_the_job(redis_env, digits):
    dead = "redis://127.0.0.1:1/0"
    sub = _submitter(redis_env)
    sub.store.url = dead  # the loop's client is made on first use, from this URL
    jobs = [_job(rows(digits, [i])) for i in range(3)]
    started = time.monotonic()
    with anyio.fail_after(30):
        outcomes = await asyncio.gather(*(sub.submit(j) for j in jobs),
                                        return_exceptions=True)
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert isinstance(outcome, Unavailable), outcome
        assert job.job_id in str(outcome) and "not enqueued" in str(outcome)
    assert time.monotonic() - started < 10  # FAST_PUBLISH: two short retries
    assert sub.messages == 0
    await sub.store.close_async()
