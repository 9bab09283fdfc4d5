"""The submit coalescer: concurrent jobs share messages, each is sent exactly once, a
lone job is sent at once, errors reach every submitter of the failed message."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from producer.coalesce import Coalescer
from shared.repository import ModelRef

pytestmark = pytest.mark.timeout(30)
REF = ModelRef("digits")


class FakeCoalescer(Coalescer):
    """Records each message instead of publishing it; ``gate`` holds a send open."""

    def __init__(self, fail_on: str | None = None):
        super().__init__(client=None, retry_policy={}, mark=False)  # type: ignore[arg-type]
        self.sent: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_send = threading.Event()
        self.fail_on = fail_on

    def send(self, ref: ModelRef, priority: str, batch: list[Any]) -> None:
        self.in_send.set()
        self.gate.wait(10)
        ids = [it.job_id for it in batch]
        self.sent.append(ids)
        if self.fail_on in ids:
            raise ConnectionError(f"broker gone while sending {len(ids)} jobs")


def wait_pending(co: Coalescer, n: int) -> None:
    """Until ``n`` submitters are queued behind the open send (other threads: no event)."""
    for _ in range(500):
        with co._lock:
            if sum(len(g.pending) for g in co._groups.values()) == n:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{n} submitters never queued up")


def submit_all(co: Coalescer, ids: list[str]) -> dict[str, BaseException | None]:
    outcome: dict[str, BaseException | None] = {}

    def one(job_id: str) -> None:
        try:
            co.publish(REF, job_id, {"image": job_id})
            outcome[job_id] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            outcome[job_id] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a submitter never returned"
    return outcome


def test_a_lone_job_is_sent_at_once_alone() -> None:
    co = FakeCoalescer()
    co.publish(REF, "a", {"image": 1})
    assert co.sent == [["a"]]


def test_jobs_arriving_during_a_send_share_the_next_message() -> None:
    co = FakeCoalescer()
    co.gate.clear()  # the first leader blocks inside its send
    first = threading.Thread(target=co.publish, args=(REF, "first", {}))
    first.start()
    assert co.in_send.wait(5)
    waiting = threading.Thread(target=submit_all, args=(co, [f"j{i}" for i in range(20)]))
    waiting.start()
    # Every later submitter is queued behind the open send before it is released.
    wait_pending(co, 20)
    co.gate.set()
    first.join(10)
    waiting.join(20)
    assert co.sent[0] == ["first"]
    assert sorted(co.sent[1]) == sorted(f"j{i}" for i in range(20))
    assert len(co.sent) == 2


def test_every_job_is_sent_exactly_once_under_contention() -> None:
    co = FakeCoalescer()
    ids = [f"j{i}" for i in range(500)]
    outcome = submit_all(co, ids)
    assert all(v is None for v in outcome.values())
    flat = [j for message in co.sent for j in message]
    assert sorted(flat) == sorted(ids)
    assert len(co.sent) <= len(ids)


def test_a_failed_send_fails_every_job_it_carried_and_no_other() -> None:
    co = FakeCoalescer(fail_on="bad")
    co.gate.clear()
    first = threading.Thread(target=submit_all, args=(co, ["first"]))
    first.start()
    assert co.in_send.wait(5)
    result: dict[str, Any] = {}
    later = threading.Thread(target=lambda: result.update(submit_all(co, ["bad", "x", "y"])))
    later.start()
    wait_pending(co, 3)
    co.gate.set()
    first.join(10)
    later.join(20)
    assert {k: type(v).__name__ if v else None for k, v in result.items()} == {
        "bad": "ConnectionError", "x": "ConnectionError", "y": "ConnectionError"}
    co.publish(REF, "after", {})  # the coalescer is still usable
    assert co.sent[-1] == ["after"]


def test_a_message_never_carries_more_bytes_than_the_cap() -> None:
    from producer.coalesce import Item, take

    pending = [Item(f"j{i}", {"image": np.zeros(1000, np.uint8)}, 0.0) for i in range(10)]
    assert [it.job_id for it in take(pending, 2600)] == ["j0", "j1"]  # 2 x (1000 + 256)
    assert len(take(pending, 1)) == 1  # a job over the cap alone still goes (alone)
    assert len(take(pending, 10**9)) == 7


def test_on_sqs_a_message_of_small_jobs_stays_under_its_limit() -> None:
    """256 jobs of 500 bytes are 128,000 bytes of input, under SQS_CHUNK_BYTES, but with
    each job's own fields they encoded to 267,904 bytes, over SQS's 262,144: each job now
    counts JOB_BYTES too, so they go in two messages."""
    from producer.bulk.chunks import SQS_CHUNK_BYTES
    from producer.coalesce import JOB_BYTES, MAX_JOBS, Item, take

    pending = [Item(f"j{i}", {"x": np.zeros(125, np.float32)}, 0.0) for i in range(MAX_JOBS)]
    first = take(pending, SQS_CHUNK_BYTES)
    assert 0 < len(first) < MAX_JOBS and pending
    assert len(first) * (500 + JOB_BYTES) <= SQS_CHUNK_BYTES
    texts = [Item("t", {"text": ["é" * 30_000] * 2}, 0.0)] * 3  # UTF-8 bytes, not 64 a row
    assert len(take(texts, SQS_CHUNK_BYTES)) == 1
