"""Queue names and depths: two queues per model (normal, and ``.high``), declared the same
way by producers and workers, and how many messages wait in them (``inferq autoscale``,
``inferq top``; the API keeps its own cached count, api/limits.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from kombu import Exchange, Queue

from shared.errors import InputError
from shared.settings import Settings

PRIORITIES = ("high", "normal")  # a worker takes from a model's high queue first
HIGH_SUFFIX = ".high"


def check_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        raise InputError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}",
                         field="priority")
    return priority


def queue_name(settings: Settings, model: str, priority: str = "normal") -> str:
    """Two queues per model (normal, and ``.high``), so workers choose what they serve
    and high-priority work skips the backlog; see docs/reliability.md."""
    name = f"{settings.queue_prefix}infer.{model}"
    return name + HIGH_SUFFIX if priority == "high" else name


def model_queue(settings: Settings, model: str, priority: str = "normal") -> Queue:
    """A queue of one model, declared the same way by producers and workers.

    On RabbitMQ it is a durable quorum queue (replicated, with delivery counting);
    Redis ignores the arguments.
    """
    name = queue_name(settings, model, priority)
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                 durable=True, queue_arguments={"x-queue-type": "quorum"})


def model_queues(settings: Settings, model: str) -> list[Queue]:
    """The queues a worker serving ``model`` consumes, high first."""
    return [model_queue(settings, model, p) for p in PRIORITIES]


def model_queue_names(settings: Settings, models: Sequence[str]) -> list[str]:
    """Every queue of each model (its normal and high-priority queue)."""
    return [q.name for m in models for q in model_queues(settings, m)]


class DepthReader:
    """Messages waiting per queue: Redis LLEN (every kombu priority list of the queue), or a
    passive ``queue_declare`` on RabbitMQ. A queue that does not exist yet holds 0."""

    def __init__(self, broker_url: str):
        self._redis: Any = None
        self._conn: Any = None
        if broker_url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            self._redis = redis.Redis.from_url(broker_url)
        else:
            from kombu import Connection

            self._conn = Connection(broker_url)

    def read(self, queues: Sequence[str]) -> dict[str, int]:
        return self._redis_depths(queues) if self._redis else self._amqp_depths(queues)

    def _redis_depths(self, queues: Sequence[str]) -> dict[str, int]:
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        pipe = self._redis.pipeline(transaction=False)
        for q in queues:
            for pri in PRIORITY_STEPS:
                pipe.llen(f"{q}{Channel.sep}{pri}" if pri else q)
        sizes = pipe.execute()
        per = len(PRIORITY_STEPS)
        return {q: sum(sizes[i * per:(i + 1) * per]) for i, q in enumerate(queues)}

    def _amqp_depths(self, queues: Sequence[str]) -> dict[str, int]:
        depths = {}
        for q in queues:
            channel = self._conn.channel()
            try:
                depths[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
            except self._conn.channel_errors:
                depths[q] = 0  # not declared yet (the error also closed the channel)
            finally:
                with contextlib.suppress(Exception):  # already closed by the broker's error
                    channel.close()
        return depths

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._conn is not None:
            self._conn.release()
