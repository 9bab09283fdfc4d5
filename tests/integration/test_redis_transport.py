"""The reliable Redis fetch (shared/redis_transport.py) against a real Redis.

The decisive test kills a consumer process at the worst moment kombu has: inside
``_deliver``, after the message left its queue and before the consumer's callback ran
(where kombu's own transport records it as unacked). With kombu's transport the message
is gone; with inferq's it is recorded, and a live consumer gets it back once the dead
one's heartbeat is stale, long before the visibility timeout.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from shared import keys
from shared.celery_app import RELIABLE_REDIS
from tests.conftest import REDIS, ROOT, need

pytestmark = pytest.mark.integration

URL = f"{REDIS}/13"  # cleaned up by key (each test's own queue names), never flushed
OPTIONS = {"visibility_timeout": 3600, "owner_dead_after": 1.5,
           "unacked_restore_interval": 1, "unacked_restore_throttle": 1}

# A consumer that SIGKILLs itself as the message is handed over (see the module doc).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from kombu import Connection, Queue
    from kombu.transport import virtual
    url, transport, queue = sys.argv[1:4]
    def die(self, message, queue):
        os.kill(os.getpid(), signal.SIGKILL)
    virtual.Transport._deliver = die
    with Connection(url, transport=transport or None,
                    transport_options={"owner_dead_after": 1.5}) as conn:
        with conn.Consumer(Queue(queue), callbacks=[lambda body, m: None]):
            conn.drain_events(timeout=20)
""")


NAME = f"transport-{uuid.uuid4().hex[:8]}"  # in every key and record this module makes


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    need(6379, "Redis")
    r = redis.Redis.from_url(URL)
    yield r
    for key in r.scan_iter(match=f"*{NAME}*"):
        r.delete(key)
    for tag, record in r.hgetall("unacked").items():
        if NAME.encode() in record:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)
            r.hdel(keys.OWNER, tag)
    for entry in r.lrange(keys.GARBAGE, 0, -1):
        if NAME.encode() in entry:
            r.lrem(keys.GARBAGE, 0, entry)


def _queue() -> Queue:
    name = f"{NAME}-{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def _held(store: redis.Redis, queue: Queue) -> list[bytes]:
    """Tags of the unacked records of ``queue``'s messages."""
    return [tag for tag, record in store.hgetall("unacked").items()
            if queue.name.encode() in record]


def _publish(queue: Queue, body: Any, transport: str | None = RELIABLE_REDIS) -> None:
    with Connection(URL, transport=transport) as conn:
        conn.Producer().publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                                declare=[queue], serializer="json")


def _kill_consumer_in_deliver(queue: Queue, transport: str | None) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, URL, transport or "", queue.name],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr[-2000:]


def _receive(queues: list[Queue], want: int, timeout: float, **options: Any
             ) -> list[tuple[Any, bool]]:
    """(body, redelivered) of up to ``want`` messages consumed (and acked) in order."""
    got: list[tuple[Any, bool]] = []
    with Connection(URL, transport=RELIABLE_REDIS,
                    transport_options={**OPTIONS, **options}) as conn:

        def on_message(body: Any, message: Any) -> None:
            got.append((body, bool(message.delivery_info.get("redelivered"))))
            message.ack()

        with conn.Consumer(queues, callbacks=[on_message]):
            deadline = time.monotonic() + timeout
            while len(got) < want and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
    return got


def test_a_consumer_killed_between_fetch_and_callback_loses_nothing(store):
    queue = _queue()
    _publish(queue, {"n": 1})
    _kill_consumer_in_deliver(queue, RELIABLE_REDIS)
    assert store.llen(queue.name) == 0
    held = _held(store, queue)
    assert len(held) == 1 and store.hget(keys.OWNER, held[0])  # recorded, owned
    started = time.monotonic()
    got = _receive([queue], 1, timeout=30)
    assert got == [({"n": 1}, True)]
    print(f"\nback after {time.monotonic() - started:.1f} s (visibility timeout 3600 s)")
    assert not _held(store, queue) and not store.hexists(keys.OWNER, held[0])


def test_kombus_own_fetch_loses_that_message(store):
    """The same kill with kombu's transport: the message is neither queued nor recorded
    (the window this transport closes)."""
    queue = _queue()
    _publish(queue, {"n": 2}, transport=None)
    _kill_consumer_in_deliver(queue, None)
    assert store.llen(queue.name) == 0
    assert not _held(store, queue)


def test_publishing_wakes_a_consumer_and_high_queues_go_first(store):
    normal, high = _queue(), _queue()
    high = Queue(normal.name + ".high", normal.exchange, routing_key=normal.name + ".high")
    for i in range(3):
        _publish(normal, {"normal": i})
    _publish(high, {"high": 0})
    assert store.llen(keys.wake(normal.name)) == 1  # one marker, however many messages
    got = [body for body, _ in _receive([normal, high], 4, 20, priority_suffix=".high")]
    assert got[0] == {"high": 0}
    assert got[1:] == [{"normal": 0}, {"normal": 1}, {"normal": 2}]  # FIFO
    assert not _held(store, normal) and not _held(store, high)


def test_a_fetch_says_whether_more_wait_and_an_emptied_queue_still_wakes(store):
    """A consumer fetches again at once only while messages wait (the script says so);
    one that emptied the queue waits on the marker, which the next publish pushes."""
    queue = _queue()
    for i in range(2):
        _publish(queue, {"n": i})
    with Connection(URL, transport=RELIABLE_REDIS, transport_options=OPTIONS) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        tags = [uuid.uuid4().hex for _ in range(3)]
        with channel.conn_or_acquire() as client:
            replies = [channel._fetch(client, [queue.name], tag) for tag in tags]
            for tag in tags[:2]:  # acked: this test only reads the replies
                channel.qos._remove_from_indices(tag, client.pipeline()).execute()
    assert [r[2] for r in replies[:2]] == [1, 0] and replies[2] is None
    assert [json.loads(r[1])["body"] for r in replies[:2]]  # the two messages, in turn
    store.delete(keys.wake(queue.name))  # as a consumer that waited on it would have
    _publish(queue, {"n": 2})
    assert store.llen(keys.wake(queue.name)) == 1
    assert _receive([queue], 1, timeout=10) == [({"n": 2}, False)]


def test_a_recorded_entry_that_is_not_a_message_is_kept_not_restored(store):
    """A consumer that died holding a garbage entry: the sweep moves the entry to the
    garbage list instead of failing on it."""
    queue = _queue()
    records = {f"{queue.name}-1": f"[not json {queue.name}",
               f"{queue.name}-2": json.dumps([[1, 2], "", queue.name])}
    for tag, record in records.items():
        store.hset("unacked", tag, record)
        store.zadd("unacked_index", {tag: 0})
    assert _receive([queue], 1, timeout=3) == []
    assert not any(store.hexists("unacked", tag) for tag in records)
    kept = set(store.lrange(keys.GARBAGE, 0, -1))
    assert {r.encode() for r in records.values()} <= kept


def test_a_fetch_whose_reply_was_lost_is_put_back(store):
    """The script ran (the message is recorded, owned by this live consumer) but its reply
    never arrived (a dropped connection, an error after the pop): restored on the next
    fetch, not after the visibility timeout."""
    queue = _queue()
    _publish(queue, {"n": 3})
    with Connection(URL, transport=RELIABLE_REDIS, transport_options=OPTIONS) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        tag = uuid.uuid4().hex
        with channel.conn_or_acquire() as client:
            assert channel._fetch(client, [queue.name], tag)  # the reply, dropped
        assert store.llen(queue.name) == 0 and store.hexists("unacked", tag)
        channel._orphans.append(tag)
        channel._restore_orphans()
        assert not store.hexists("unacked", tag) and not store.hexists(keys.OWNER, tag)
        assert store.llen(queue.name) == 1
    assert _receive([queue], 1, timeout=10) == [({"n": 3}, True)]


def test_deployments_sharing_a_database_never_sweep_each_others_messages(store):
    """Two deployments (queue prefixes) on one Redis database, one with a 1 s visibility
    timeout: its restore sweep brings back its own overdue message but leaves alone the one
    the other deployment is still working on (with kombu's shared ``unacked`` records it
    redelivered that one: a second run of a job still running)."""
    fast, slow = (f"{NAME}-{uuid.uuid4().hex[:6]}-{d}." for d in ("fast", "slow"))
    fast_q, slow_q = (Queue(p + "infer", Exchange(p + "infer", type="direct"),
                            routing_key=p + "infer") for p in (fast, slow))
    _publish(fast_q, {"fast": 1})
    _publish(slow_q, {"slow": 1})
    with Connection(URL, transport=RELIABLE_REDIS,
                    transport_options={**OPTIONS, "state_prefix": slow}) as slow_conn, \
            Connection(URL, transport=RELIABLE_REDIS,
                       transport_options={**OPTIONS, "state_prefix": fast,
                                          "visibility_timeout": 1}) as fast_conn:
        slow_channel, fast_channel = slow_conn.default_channel, fast_conn.default_channel
        slow_q(slow_channel).declare()
        fast_q(fast_channel).declare()
        held = slow_channel.basic_get(slow_q.name)  # working on it, not acked
        assert held.payload == {"slow": 1}
        assert fast_channel.basic_get(fast_q.name).payload == {"fast": 1}
        time.sleep(1.5)  # both now older than the fast deployment's visibility timeout
        fast_channel.qos.restore_visible(num=1000, interval=1)
        assert store.llen(fast_q.name) == 1  # its own message: back on its queue
        assert store.llen(slow_q.name) == 0  # the other's: still held
        assert store.hexists(slow + "unacked", held.delivery_tag)  # in its own records
        held.ack()
        assert not store.hexists(slow + "unacked", held.delivery_tag)


def test_an_idle_consumer_gets_a_message_with_its_wake_up(store, monkeypatch):
    """The wait on the markers and the fetch go in one write: Redis runs the fetch as the
    wait ends, so a woken consumer makes no second round trip; after a wait longer than 1%
    of the visibility timeout, the message's time in the unacked index is restamped (the
    fetch's arguments were written before the wait)."""
    from shared.redis_transport import Channel

    fetches: list[str] = []
    monkeypatch.setattr(Channel, "_fetch", lambda self, *a: fetches.append("fetch"))
    queue = _queue()
    seen: list[tuple[Any, float, float]] = []
    with Connection(URL, transport=RELIABLE_REDIS,
                    transport_options={**OPTIONS, "visibility_timeout": 20}) as conn:

        def on_message(body: Any, message: Any) -> None:
            score = store.zscore("unacked_index", message.delivery_tag)
            seen.append((body, score, time.time()))
            message.ack()

        with conn.Consumer([queue], callbacks=[on_message]):
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)  # now waiting on the marker
            # the wait under test: 0.5 s, over 1% of the 20 s visibility timeout
            timer = threading.Timer(0.5, _publish, (queue, {"n": 1}))
            timer.start()
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
            timer.join()
    assert fetches == []
    [(body, score, at)] = seen
    assert body == {"n": 1}
    assert score is not None and at - score < 0.2, (at, score)  # not the wait's start
    assert not _held(store, queue)
