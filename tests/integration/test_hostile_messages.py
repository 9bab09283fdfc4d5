"""Messages put on a queue by hand, bypassing the SDK: refused, dead-lettered, and the
worker keeps serving."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pytest
import redis

from shared import codec
from shared.celery_app import INFER_TASK
from shared.dead_letters import read_dead_letters
from shared.queues import model_queue
from tests.conftest import client_for, wait_until

pytestmark = pytest.mark.integration


def test_hand_crafted_messages_are_dead_lettered_and_the_worker_survives(
        broker_env, start_worker, digits):
    env = {**broker_env, "INFERQ_MAX_MESSAGE_BYTES": "200000"}  # the worker's cap
    worker = start_worker(env)
    client = client_for(broker_env)
    queue = model_queue(client.settings, "digits")
    send = client.app.send_task
    send("inferq.no_such_task", kwargs={"model": "digits"}, task_id="unknown-task",
         queue=queue)
    send(INFER_TASK, kwargs={"model": "digits", "bogus": 1}, task_id="wrong-signature",
         queue=queue)
    send(INFER_TASK, kwargs={"model": "digits", "inputs": {"image": [[0.0] * 64]}},
         task_id="foreign-serializer", queue=queue, serializer="pickle")
    huge = np.random.default_rng(0).random((1000, 1, 8, 8)).astype(np.float32)  # ~256 KB
    send(INFER_TASK, kwargs={"model": "digits", "inputs": {"image": huge}},
         task_id="too-big", queue=queue)
    good = client.submit("digits", digits["x"][3])
    assert int(good.result(timeout=30)["label"][0]) == int(digits["label"][3])
    r = redis.Redis.from_url(env["INFERQ_RESULT_BACKEND"])
    # written by the worker as it refuses each one
    entries = wait_until(lambda: (found := read_dead_letters(r, env["INFERQ_QUEUE_PREFIX"]))
                         and len(found) >= 4 and found, 20, "4 dead letters")
    reasons = {e["message_id"]: e["reason"] for e in entries}
    assert reasons.keys() == {"unknown-task", "wrong-signature", "foreign-serializer",
                              "too-big"}
    assert "no such task: 'inferq.no_such_task'" in reasons["unknown-task"]
    assert "wrong arguments" in reasons["wrong-signature"]
    assert "application/x-python-serialize' is not accepted" in reasons["foreign-serializer"]
    assert "200000" in reasons["too-big"] or "INFERQ_MAX_MESSAGE_BYTES" in reasons["too-big"]
    print("\n" + "\n".join(f"{k}: {v}" for k, v in sorted(reasons.items())))
    assert worker.proc.poll() is None  # still running
    again = client.submit("digits", digits["x"][4])
    assert int(again.result(timeout=30)["label"][0]) == int(digits["label"][4])


# -- messages written at the broker level, as any host that can reach the broker could ---

def _publish_raw(client: Any, queue: Any, body: bytes, content_type: str,
                 headers: dict[str, Any]) -> None:
    """One message as it would arrive from a foreign producer: body bytes as given."""
    with client.app.connection_for_write() as conn:
        producer = conn.Producer()
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue], content_type=content_type,
                         content_encoding="binary", headers=headers, retry=False)


def _task_headers(task: str = INFER_TASK, **extra: Any) -> dict[str, Any]:
    return {"task": task, "id": f"hostile-{uuid.uuid4().hex[:8]}", "lang": "py", **extra}


def _crafted(client: Any) -> list[tuple[str, bytes, str, dict[str, Any]]]:
    """(what, body, content type, headers) of each hand-made message."""
    good_body = codec.dumps([[], {"model": "digits", "inputs": {"image": [[0.0] * 64]}}, {}])
    return [
        ("empty body", b"", codec.CONTENT_TYPE, _task_headers()),
        ("truncated body", good_body[:7], codec.CONTENT_TYPE, _task_headers()),
        ("not msgpack", b"\xc1\xff\x00garbage", codec.CONTENT_TYPE, _task_headers()),
        ("body not [args, kwargs, embed]", codec.dumps({"a": 1}), codec.CONTENT_TYPE,
         _task_headers()),
        ("Celery built-in", json.dumps([[[1, 2]], {}, {}]).encode(), "application/json",
         _task_headers("celery.accumulate")),
        ("wrong header type", good_body, codec.CONTENT_TYPE,
         _task_headers(timelimit="soon", retries="3")),
        ("eta", good_body, codec.CONTENT_TYPE,
         _task_headers(eta="2030-01-01T00:00:00+00:00")),
        ("callback", codec.dumps([[], {"model": "digits", "inputs": {"image": [[0.0] * 64]}},
                                  {"callbacks": [{"task": "celery.accumulate"}]}]),
         codec.CONTENT_TYPE, _task_headers()),
        ("no task header", good_body, codec.CONTENT_TYPE, {"id": "x"}),
        ("text content", b"hello", "text/plain", _task_headers()),
    ]


def start_and_send_crafted(env: dict[str, str], start_worker: Any
                           ) -> tuple[Any, Any, Any, list[Any]]:
    """A worker, a client, the digits queue, and every crafted message sent to it."""
    worker = start_worker(env)
    client = client_for(env)
    queue = model_queue(client.settings, "digits")
    crafted = _crafted(client)
    for _, body, content_type, headers in crafted:
        _publish_raw(client, queue, body, content_type, headers)
    return worker, client, queue, crafted


def test_malformed_messages_never_stop_a_worker(broker_env, start_worker, digits):
    """Each message is refused before Celery's strategy runs it, dead-lettered with a
    reason, and the same worker goes on serving (before: an empty body made every worker
    that took it exit, and ``celery.accumulate`` ran)."""
    worker, client, queue, crafted = start_and_send_crafted(broker_env, start_worker)
    garbage = 0
    if broker_env["INFERQ_BROKER_URL"].startswith("redis"):
        r = redis.Redis.from_url(broker_env["INFERQ_BROKER_URL"])
        for entry in (b"", b"not json", b"[1, 2]", b'{"properties": 3}',
                      # kombu's JSON decodes "__type__" objects: these raise other errors
                      b'{"__type__": "bytes", "__value__": 5}',
                      json.dumps({"body": "", "properties": {"delivery_info": {}},
                                  "headers": {"x": {"__type__": "decimal",
                                                    "__value__": "x"}}}).encode(),
                      b"[" * 100_000 + b"]" * 100_000,
                      json.dumps({"body": "", "headers": None,
                                  "properties": {"delivery_info": {}}}).encode(),
                      json.dumps({"body": "@@@", "properties": {"delivery_info": {}},
                                  "headers": {}, "content-type": "application/json",
                                  "properties_": 1}).encode()):
            r.lpush(queue.name, entry)  # straight into the list, not even kombu's envelope
            garbage += 1
    good = client.submit("digits", digits["x"][5])
    assert int(good.result(timeout=30)["label"][0]) == int(digits["label"][5])
    store = redis.Redis.from_url(broker_env["INFERQ_RESULT_BACKEND"])
    expected = len(crafted) + garbage
    entries = wait_until(lambda: (found := read_dead_letters(
        store, broker_env["INFERQ_QUEUE_PREFIX"], limit=100)) and len(found) >= expected
        and found, 30, f"{expected} dead letters")
    print("\n" + "\n".join(sorted(str(e["reason"]) for e in entries)))
    reasons = " | ".join(str(e["reason"]) for e in entries)
    for needle in ("the message body is empty", "no such task: 'celery.accumulate'",
                   "headers['retries'] must be int", "headers['eta'] must be absent",
                   "callbacks, errbacks", "headers['task'] is missing",
                   "'text/plain' is not accepted", "cannot decode the message"):
        assert needle in reasons, needle
    if garbage:
        assert reasons.count("not a kombu message") >= 8
    assert worker.proc.poll() is None
    assert "Unrecoverable error" not in worker.log.read_text(errors="replace")
    again = client.submit("digits", digits["x"][6])
    assert int(again.result(timeout=30)["label"][0]) == int(digits["label"][6])
