"""``python -m bench fetch``: inferq's reliable Redis transport against kombu's own, in one
run, rounds interleaved (kombu, inferq, kombu, inferq, ...) so machine noise hits both.

Per transport: publishing N small messages (msgs/s), draining them with acks
(msgs/s, CPU of this process and of Redis per message), the latency from publish to the
consumer's callback with the consumer idle between messages (p50/p99: kombu's BRPOP
returns the message; inferq's wakes on a marker, then fetches), and what an idle consumer
costs (Redis commands per second).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
from kombu import Connection, Exchange, Queue

from bench.config import REDIS_URL
from bench.cpu import redis_cpu_seconds, self_cpu_seconds
from shared.celery_app import RELIABLE_REDIS

TRANSPORTS = {"kombu": None, "inferq": RELIABLE_REDIS}
BODY = {"job": "x" * 64, "rows": 1}


def _queue() -> Queue:
    name = f"bench.fetch.{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


@contextmanager
def _connection(transport: str | None) -> Iterator[Connection]:
    with Connection(REDIS_URL, transport=transport,
                    transport_options={"visibility_timeout": 3600}) as conn:
        yield conn


def _publish(transport: str | None, queue: Queue, n: int) -> float:
    with _connection(transport) as conn:
        producer = conn.Producer()
        producer.declare()
        started = time.perf_counter()
        for _ in range(n):
            producer.publish(BODY, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue], serializer="json", retry=False)
        return n / (time.perf_counter() - started)


def _drain(transport: str | None, queue: Queue, n: int, store: Any) -> dict[str, float]:
    got = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal got
        got += 1
        message.ack()

    with _connection(transport) as conn, conn.Consumer(queue, callbacks=[on_message]) as c:
        c.qos(prefetch_count=32)
        cpu, rcpu, started = self_cpu_seconds(), redis_cpu_seconds(store), time.perf_counter()
        while got < n:
            conn.drain_events(timeout=10)
        wall = time.perf_counter() - started
        return {"drain_msgs_s": n / wall,
                "client_us_per_msg": (self_cpu_seconds() - cpu) / n * 1e6,
                "redis_us_per_msg": (redis_cpu_seconds(store) - rcpu) / n * 1e6}


def _latency(transport: str | None, queue: Queue, n: int, store: Any) -> dict[str, float]:
    """Publish one message at a time to an idle consumer; publish -> callback, ms."""
    arrived = threading.Event()
    stop = threading.Event()
    lat: list[float] = []
    sent = [0.0]

    def consume() -> None:
        def on_message(body: Any, message: Any) -> None:
            lat.append((time.perf_counter() - sent[0]) * 1000)
            message.ack()
            arrived.set()

        with _connection(transport) as conn, conn.Consumer(queue, callbacks=[on_message]):
            while not stop.is_set():
                with suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(1.0)  # the consumer is up and waiting
    with _connection(transport) as conn:
        producer = conn.Producer()
        for _ in range(n):
            arrived.clear()
            time.sleep(0.005)  # the consumer is back to waiting
            sent[0] = time.perf_counter()
            producer.publish(BODY, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue], serializer="json", retry=False)
            if not arrived.wait(10):
                raise RuntimeError("a message did not arrive within 10 s")
        commands = store.info("stats")["total_commands_processed"]
        time.sleep(3.0)  # idle: what does waiting cost?
        idle = (store.info("stats")["total_commands_processed"] - commands) / 3.0
    stop.set()
    thread.join(5)
    ordered = sorted(lat)
    return {"p50_ms": statistics.median(ordered), "p99_ms": ordered[int(len(ordered) * 0.99)],
            "idle_redis_cmds_s": idle}


def _cleanup(store: Any) -> None:
    for key in store.scan_iter(match="*bench.fetch.*"):
        store.delete(key)


def fetch(messages: int = 20_000, rounds: int = 3, pings: int = 500) -> int:
    store = redis.Redis.from_url(REDIS_URL)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in TRANSPORTS}
    try:
        for r in range(rounds):
            for name, transport in TRANSPORTS.items():
                queue = _queue()
                row = {"publish_msgs_s": _publish(transport, queue, messages)}
                row.update(_drain(transport, queue, messages, store))
                row.update(_latency(transport, _queue(), pings, store))
                results[name].append(row)
                print(f"round {r + 1} {name}: " + ", ".join(
                    f"{k} {v:,.1f}" for k, v in row.items()), flush=True)
    finally:
        _cleanup(store)
    print(f"\nmedian of {rounds} rounds, {messages:,} messages, {pings} pings "
          f"(Redis {REDIS_URL}); ratio = inferq / kombu")
    print(f"{'':22}{'kombu':>12}{'inferq':>12}{'ratio':>8}")
    for key in results["kombu"][0]:
        k = statistics.median(row[key] for row in results["kombu"])
        i = statistics.median(row[key] for row in results["inferq"])
        print(f"{key:22}{k:12,.2f}{i:12,.2f}{i / k if k else float('nan'):8.2f}")
    return 0
