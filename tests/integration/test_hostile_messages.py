"""Messages put on a queue by hand, bypassing the SDK: refused, dead-lettered, and the
worker keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from shared.celery_app import INFER_TASK, model_queue
from shared.dead_letters import read_dead_letters
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
