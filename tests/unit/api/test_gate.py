"""The worker's gate (workers/rejects.py: refusal): which task messages may reach Celery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from kombu.serialization import loads, prepare_accept_content

from shared import codec
from shared.celery_app import INFER_TASK
from workers.rejects import refusal

TASKS = frozenset({INFER_TASK})
ACCEPT = frozenset(prepare_accept_content(codec.ACCEPT))  # as the worker builds it


@dataclass
class Message:
    """What refusal reads of a kombu message."""

    body: bytes = field(default_factory=lambda: codec.dumps(
        [[], {"model": "digits", "inputs": {"image": [[0.0] * 64]}}, {}]))
    headers: Any = field(default_factory=lambda: {"task": INFER_TASK, "id": "job-1"})
    content_type: str = codec.CONTENT_TYPE

    def decode(self) -> Any:
        return loads(self.body, self.content_type, "binary", accept=ACCEPT)


@pytest.fixture(autouse=True)
def _codec() -> None:
    codec.register()


def headers(**extra: Any) -> dict[str, Any]:
    return {"task": INFER_TASK, "id": "job-1", **extra}


def test_a_task_message_of_inferqs_passes() -> None:
    assert refusal(Message(), TASKS, ACCEPT) is None
    as_json = Message(body=b'[[], {"model": "digits"}, {}]', content_type="application/json")
    assert refusal(as_json, TASKS, ACCEPT) is None  # JSON is accepted content too
    assert refusal(Message(headers=headers(retries=0, timelimit=[None, 30],
                                           expires="2030-01-01T00:00:00+00:00")),
                   TASKS, ACCEPT) is None


@pytest.mark.parametrize("message, reason", [
    (Message(body=b""), "the message body is empty"),
    (Message(body=b"\x01\x02"), "cannot decode the message"),
    (Message(headers=None), "no headers mapping"),
    (Message(headers=["x"]), "no headers mapping"),
    (Message(headers={"id": "x"}), "headers['task'] is missing"),
    (Message(headers=headers(task="celery.accumulate")), "no such task: 'celery.accumulate'"),
    (Message(headers=headers(id=7)), "headers['id'] is missing or not a string"),
    (Message(headers=headers(retries="3")), "headers['retries'] must be int"),
    (Message(headers=headers(retries=True)), "headers['retries'] must be int"),
    (Message(headers=headers(eta="2030-01-01T00:00:00")), "headers['eta'] must be absent"),
    (Message(headers=headers(expires="soon")), "not an ISO 8601 time"),
    (Message(headers=headers(timelimit=[1, 2, 3])), "[soft, hard] seconds"),
    (Message(headers=headers(timelimit=["a", 1])), "[soft, hard] seconds"),
    (Message(content_type="application/x-python-serialize"), "is not accepted"),
    (Message(body=codec.dumps({"args": []})), "not Celery's [args, kwargs, embed]"),
    (Message(body=codec.dumps([[], {1: 2}, {}])), "argument names must be strings"),
    (Message(body=codec.dumps([[], {}, {"chain": [{"task": "celery.accumulate"}]}])),
     "callbacks, errbacks, chains and chords"),
    (Message(headers=headers(inferq_refused="the queue entry is not a kombu message")),
     "not a kombu message"),
])
def test_what_is_refused_and_why(message: Message, reason: str) -> None:
    got = refusal(message, TASKS, ACCEPT)
    assert got is not None and reason in got, got
