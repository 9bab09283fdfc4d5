"""Property: no message on a model queue, however malformed, stops a worker.

Hypothesis writes messages at the broker level (any content type, body bytes, header
names and value types, Celery built-in task names; on Redis also raw list entries that
are not kombu messages at all) to a real ``inferq worker``; after each example the same
worker still answers a real job, and every message with a string id ended, as a dead
letter or a stored result.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.celery_app import INFER_MANY_TASK, INFER_TASK
from shared.dead_letters import read_dead_letters
from shared.queues import model_queue
from tests.conftest import client_for, wait_until
from tests.integration.test_hostile_messages import _publish_raw

pytestmark = pytest.mark.integration

FRESH = "<fresh id>"  # replaced by a new uuid when published, so ids never collide
HEADERS = ("task", "id", "eta", "expires", "retries", "timelimit", "root_id", "parent_id",
           "group", "group_index", "shadow", "argsrepr", "kwargsrepr", "origin",
           "ignore_result", "stamped_headers", "stamps", "lang", "x-other")
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
task_names = st.sampled_from([INFER_TASK, INFER_MANY_TASK, "celery.accumulate",
                              "celery.chord_unlock", "celery.backend_cleanup", "inferq.x"])
headers = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"task": st.one_of(task_names, values),
                           "id": st.one_of(st.just(FRESH), values)}),
    st.dictionaries(st.sampled_from(HEADERS), values, max_size=4))
kwargs = st.one_of(
    st.just({"model": "digits", "inputs": {"image": [[0.5] * 64]}}),
    st.dictionaries(st.sampled_from(["model", "inputs", "version", "variant", "first_row",
                                     "row_ids", "deadline", "jobs", "bogus"]),
                    values, max_size=4))
bodies = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda a, k, e: codec.dumps([a, k, e]), st.lists(values, max_size=2), kwargs,
              st.one_of(st.none(), st.dictionaries(
                  st.sampled_from(["callbacks", "errbacks", "chain", "chord", "x"]),
                  values, max_size=2))),
    st.builds(lambda v: msgpack.packb(v), values),
    st.builds(lambda b, n: b[:n], st.builds(codec.dumps, st.lists(values, max_size=3)),
              st.integers(0, 30)))
content_types = st.sampled_from([codec.CONTENT_TYPE, "application/json", "text/plain",
                                 "application/x-python-serialize", ""])
messages = st.tuples(bodies, content_types, headers)
raw_entries = st.one_of(st.binary(max_size=40), st.builds(
    lambda v: json.dumps(v).encode(), values))


def _amqp_safe(value: Any) -> bool:
    """Header values pyamqp can encode (it refuses some; such a message cannot be sent)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _amqp_safe(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_amqp_safe(v) for v in value)
    return not isinstance(value, int) or isinstance(value, bool) or -2**63 <= value < 2**63


def test_no_message_stops_a_worker(broker_env, start_worker, digits):
    worker = start_worker(broker_env)
    client = client_for(broker_env)
    queue = model_queue(client.settings, "digits")
    on_redis = broker_env["INFERQ_BROKER_URL"].startswith("redis")
    broker = redis.Redis.from_url(broker_env["INFERQ_BROKER_URL"]) if on_redis else None
    store = redis.Redis.from_url(broker_env["INFERQ_RESULT_BACKEND"])
    prefix = broker_env["INFERQ_QUEUE_PREFIX"]
    examples = {"n": 0, "messages": 0}

    def ended(job_id: str) -> bool:
        return bool(store.exists(f"celery-task-meta-{job_id}")) or any(
            e.get("message_id") == job_id for e in read_dead_letters(store, prefix, 10_000))

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages, min_size=1, max_size=4), st.lists(raw_entries, max_size=2))
    def example(batch: list[tuple[bytes, str, dict[str, Any]]], raw: list[bytes]) -> None:
        examples["n"] += 1
        ids = []
        for body, content_type, hdrs in batch:
            if hdrs.get("id") == FRESH:
                hdrs["id"] = f"fuzz-{uuid.uuid4().hex}"
                ids.append(hdrs["id"])
            if not on_redis and not _amqp_safe(hdrs):
                continue
            _publish_raw(client, queue, body, content_type, hdrs)
            examples["messages"] += 1
        if broker is not None:
            for entry in raw:
                broker.lpush(queue.name, entry)
                examples["messages"] += 1
        # the same worker still serves, after every hostile message before this job
        good = client.submit("digits", digits["x"][7])
        assert int(good.result(timeout=30)["label"][0]) == int(digits["label"][7])
        assert worker.proc.poll() is None, worker.log.read_text(errors="replace")[-3000:]
        for job_id in ids:
            wait_until(lambda j=job_id: ended(j), 20, f"message {job_id} to end")

    example()
    print(f"\n{examples['n']} examples, {examples['messages']} hostile messages; "
          f"{len(read_dead_letters(store, prefix, 100_000))} dead letters")
    assert "Unrecoverable error" not in worker.log.read_text(errors="replace")
