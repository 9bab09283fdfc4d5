"""The result listener's reply channel (fakeredis): a job's result published on the
process's channel reaches its waiter without a read, before or after the wait starts."""

from __future__ import annotations

import threading

import fakeredis
import msgpack
import pytest

from producer.waiter import ResultWaiter

pytestmark = pytest.mark.timeout(20)
CHANNEL = b"inferq-reply-test"


def never_read() -> None:
    raise AssertionError("the store was read: the reply did not arrive")


@pytest.fixture
def waiter() -> ResultWaiter:
    w = ResultWaiter(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    assert w.ready(CHANNEL)
    return w


def publish(waiter: ResultWaiter, *pairs: tuple[str, bytes]) -> None:
    waiter._redis.publish(CHANNEL, msgpack.packb(list(pairs), use_bin_type=True))


def test_a_reply_wakes_its_waiter_and_only_it(waiter: ResultWaiter) -> None:
    got: dict[str, object] = {}

    def wait(job_id: str) -> None:
        got[job_id] = waiter.wait_reply(job_id, never_read, lambda v: v is not None,
                                        bytes.decode, 10)

    threads = [threading.Thread(target=wait, args=(j,)) for j in ("a", "b")]
    for t in threads:
        t.start()
    while len(waiter._replies) < 2:  # both registered (another thread: nothing to wait on)
        threading.Event().wait(0.001)
    publish(waiter, ("b", b"result-b"), ("a", b"result-a"))
    for t in threads:
        t.join(10)
    assert got == {"a": "result-a", "b": "result-b"}
    assert waiter._replies == {}


def test_a_reply_that_comes_first_is_kept_for_its_wait(waiter: ResultWaiter) -> None:
    publish(waiter, ("early", b"done"))
    for _ in range(2000):
        with waiter._lock:
            if "early" in waiter._early:
                break
        threading.Event().wait(0.001)
    assert waiter.wait_reply("early", never_read, lambda v: v is not None, bytes.decode,
                             5) == "done"
    assert "early" not in waiter._early


def test_without_a_reply_the_store_is_read_until_the_timeout(waiter: ResultWaiter) -> None:
    reads = []

    def read() -> None:
        reads.append(1)

    assert waiter.wait_reply("lost", read, lambda v: v is not None, bytes.decode, 1.2) is None
    assert len(reads) >= 2  # the safety net re-reads every RECHECK_S


def test_foreign_messages_on_the_reply_channel_do_not_stop_the_listener(
        waiter: ResultWaiter) -> None:
    for junk in (b"\xc1 not msgpack", msgpack.packb({"a": 1}), msgpack.packb([[1, 2, 3], "x"]),
                 msgpack.packb([["late", "text, not bytes"]])):
        waiter._redis.publish(CHANNEL, junk)
    publish(waiter, ("after", b"done"))  # the listener read past the junk
    assert waiter.wait_reply("after", never_read, lambda v: v is not None, bytes.decode,
                             5) == "done"
    assert waiter._thread is not None and waiter._thread.is_alive()
