"""Messages put straight on a Redis queue (producer/direct.py) against a real Redis: the
same headers and routing as Celery's ``send_task``; ``send_task`` again when something
listens to Celery's publish signals; a broker outage fails within the retry policy."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import numpy as np
import pytest
from celery import signals
from kombu.exceptions import OperationalError

from producer.publish import PUBLISH_RETRY, summary
from shared import codec
from shared.celery_app import INFER_MANY_TASK
from shared.queues import model_queue
from shared.repository import ModelRef
from tests.conftest import client_for

pytestmark = pytest.mark.integration


def _sent(client: Any, queue: str) -> dict[str, Any]:
    raw = client.app.backend.client.rpop(queue)
    assert raw is not None, f"nothing on {queue}"
    return json.loads(raw)


def _comparable(message: dict[str, Any]) -> dict[str, Any]:
    """What must agree between two messages of different ids: all but ids and tags."""
    headers = {k: v for k, v in message["headers"].items()
               if k not in ("id", "root_id", "kwargsrepr")}
    properties = {k: v for k, v in message["properties"].items()
                  if k not in ("correlation_id", "delivery_tag", "argsrepr", "kwargsrepr")}
    return {**message, "headers": headers, "properties": properties, "body": None}


def test_a_direct_message_is_the_one_send_task_sends(redis_env) -> None:
    client = client_for(redis_env)
    queue = model_queue(client.settings, f"direct-{uuid.uuid4().hex[:8]}", "normal")
    ref = ModelRef("digits")
    kwargs = {"model": "digits", "variant": None, "version": None, "reply_to": "r",
              "jobs": [{"id": "j", "inputs": {"image": np.ones((1, 64), np.float32)},
                        "submitted_at": 1.0}]}
    options = summary(ref, ["j"], jobs=1)
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    client.app.send_task(INFER_MANY_TASK, task_id="many-a", kwargs=kwargs, queue=queue,
                         retry=True, retry_policy=PUBLISH_RETRY, headers=dict(trace),
                         **options)
    celery_sent = _sent(client, queue.name)
    client.send_message(INFER_MANY_TASK, "many-b", kwargs, queue, PUBLISH_RETRY,
                        dict(trace), **options)
    direct_sent = _sent(client, queue.name)
    assert direct_sent["headers"]["id"] == "many-b"
    assert direct_sent["headers"]["kwargsrepr"] == celery_sent["headers"]["kwargsrepr"] \
        == "{'model': 'digits', 'jobs': 1, 'ids': ['j']}"
    assert _comparable(direct_sent) == _comparable(celery_sent)
    bodies = [codec.loads(base64.b64decode(m["body"])) for m in (celery_sent, direct_sent)]
    np.testing.assert_array_equal(bodies[0][1]["jobs"][0]["inputs"]["image"],
                                  bodies[1][1]["jobs"][0]["inputs"]["image"])
    assert bodies[0][1]["model"] == bodies[1][1]["model"] == "digits"


def test_a_publish_signal_listener_gets_send_task(redis_env, monkeypatch) -> None:
    """Instrumentations (OpenTelemetry's Celery one) hook Celery's publish signals: with a
    listener connected, messages go through ``send_task``, which sends them."""
    client = client_for(redis_env)
    heard: list[str] = []

    def listener(sender: Any = None, **_: Any) -> None:
        heard.append(sender)

    signals.before_task_publish.connect(listener)
    try:
        queue = model_queue(client.settings, f"direct-{uuid.uuid4().hex[:8]}", "normal")
        client.send_message(INFER_MANY_TASK, "many-c", {"model": "digits", "jobs": []},
                            queue, PUBLISH_RETRY)
        assert heard == [INFER_MANY_TASK]
        assert _sent(client, queue.name)["headers"]["id"] == "many-c"
    finally:
        signals.before_task_publish.disconnect(listener)


def test_a_broker_that_is_down_fails_within_the_retry_policy(redis_env) -> None:
    client = client_for({**redis_env, "INFERQ_BROKER_URL": "redis://127.0.0.1:1/0"})
    queue = model_queue(client.settings, "direct-down", "normal")
    policy = {"max_retries": 2, "interval_start": 0.1, "interval_max": 0.2}
    started = time.monotonic()
    with pytest.raises(OperationalError, match="127.0.0.1:1"):
        client.send_message(INFER_MANY_TASK, "many-d", {"model": "digits", "jobs": []},
                            queue, policy)
    assert time.monotonic() - started < 3.0
