"""Poison messages end: redeliveries are counted, and the row that kills a worker is found.

A first delivery costs nothing here. A message the broker hands out again (its worker died,
or was stopped, before acking it: ``delivery_info['redelivered']`` on Redis and RabbitMQ)
is *suspect*: it is recorded (``inferq-deliveries-<message id>``, a hash, with a history
list of who took it when) and its rows run one at a time, each model call preceded by
writing the row's index as the hash's ``cursor`` (removed after the call; the batcher
runs such a row alone, never beside another call). If that worker dies too, the next
delivery finds the cursor and blames that row. A row blamed ``BLAME_LIMIT`` times is not
run again: it fails alone, with an error saying so, and goes to the dead-letter list
with its history; every other row of the message gets its result. A message whose worker
died ``INFERQ_MAX_DELIVERIES`` - 1 times while it ran (a crash outside the model call,
several killer rows) is dead-lettered whole: each of its jobs fails with the reason.

A suspect delivery counts toward that limit only once its first row starts: a worker
killed while the message still waited for its turn (suspect rows run one at a time, so
after a kill most of the returned messages wait) did not die of it. Deliveries that never
got to run are capped separately, at ``TAKEN_FACTOR`` times the limit, so a message that
kills its worker before any row runs (while being decoded, say) still ends.

Blaming twice, not once, keeps a worker killed from outside (a deploy, the OOM killer)
while it ran a suspect row from failing that innocent row. For that to hold, a blamed row
runs *first* in the next delivery, not at its place: run in order from row 0, the next
worker would reach it again about as long after it starts as the last one did, and a
second outside kill at a similar moment (a rolling restart, a chaos schedule) would blame
it again. Run first, a row that kills does so at once (found one delivery sooner), and an
innocent one is exposed to an outside kill for one model call only.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from workers.batcher import Outcome
from workers.pool import ModelPool, Served

logger = logging.getLogger(__name__)

STORE_DOWN = (RedisConnectionError, RedisTimeoutError)
GIVE_BACK_PAUSE_S = 1.0  # before handing a message back while the result store is away
BLAME_LIMIT = 2  # deaths while running a row before it is dead-lettered
TAKEN_FACTOR = 4  # deliveries taken (started or not) per allowed delivery
DEAD_LETTERS_KEPT = 10_000  # newest entries kept in the dead-letter list

# One round trip per redelivery: count it as taken, turn a cursor left by a dead worker
# into blame, append to the history, and read it all back. ``n`` (deliveries whose rows
# started) is counted by ``Deliveries.running``.
_RECORD = """
redis.call('HINCRBY', KEYS[1], 'taken', 1)
local cursor = redis.call('HGET', KEYS[1], 'cursor')
if cursor then
  redis.call('HINCRBY', KEYS[1], 'blame:' .. cursor, 1)
  redis.call('HDEL', KEYS[1], 'cursor')
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""


@dataclass
class Delivery:
    """What is known about a redelivered message."""

    message_id: str
    count: int  # this delivery's number: 2 for the first redelivery that runs rows
    taken: int  # redeliveries taken so far, this one included, whether rows ran or not
    blamed: dict[int, int] = field(default_factory=dict)  # row -> deaths while it ran
    history: list[str] = field(default_factory=list)  # "host pid time" per redelivery
    started: bool = False  # a row of this delivery began (counted in ``n``)

    def dead_rows(self) -> set[int]:
        return {row for row, deaths in self.blamed.items() if deaths >= BLAME_LIMIT}

    def once_blamed(self) -> list[int]:
        """Rows blamed but not yet dead: they run first (see the module's doc)."""
        return sorted(row for row, deaths in self.blamed.items() if 0 < deaths < BLAME_LIMIT)


class Deliveries:
    """Redelivery records and the dead-letter list, in the Redis result store."""

    def __init__(self, redis: Any, *, expires: int, max_deliveries: int, queue_prefix: str):
        self.redis = redis
        self.expires = expires
        self.max_deliveries = max_deliveries
        self.dead_key = keys.dead_letters(queue_prefix)
        self._record = redis.register_script(_RECORD)

    def record(self, message_id: str, hostname: str | None) -> Delivery:
        key = keys.deliveries(message_id)
        who = f"{hostname or socket.gethostname()} {time.time():.3f}"
        fields, history = self._record(keys=[key, key + "-history"], args=[who, self.expires])
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        blamed = {int(k[6:]): int(v) for k, v in values.items() if k.startswith(b"blame:")}
        delivery = Delivery(message_id, int(values.get(b"n", 0)) + 2, int(values[b"taken"]),
                            blamed, [h.decode() for h in history])
        logger.warning("message %s delivered again (delivery %d; rows blamed for worker "
                       "deaths: %s)", message_id, delivery.count, blamed or "none")
        return delivery

    @contextmanager
    def running(self, delivery: Delivery, row: int) -> Iterator[None]:
        """Around a suspect row's model call: should this process die inside, the next
        delivery blames ``row``; the delivery's first row counts it in ``n``."""
        key = keys.deliveries(delivery.message_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, "cursor", row)
        if not delivery.started:
            pipe.hincrby(key, "n", 1)
        pipe.execute()
        delivery.started = True
        try:
            yield
        finally:  # a row that raised did not kill its worker
            self.redis.hdel(key, "cursor")

    def done(self, message_id: str) -> None:
        """The message ended (stored and about to be acked): forget its record."""
        key = keys.deliveries(message_id)
        self.redis.delete(key, key + "-history")

    def redelivery(self, request: Any) -> Delivery | None:
        """The record of a Celery task request's message when the broker redelivered it;
        None for a first delivery (which costs nothing)."""
        if not (request.delivery_info or {}).get("redelivered"):
            return None
        return self.record(request.id, request.hostname)

    def too_many(self, delivery: Delivery) -> bool:
        return (delivery.count > self.max_deliveries
                or delivery.taken > TAKEN_FACTOR * self.max_deliveries)

    def dead_letter(self, entry: dict[str, Any]) -> None:
        """Append an entry (JSON: what, why, history) to the dead-letter list."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.dead_key, json.dumps({"at": time.time(), **entry}, default=str))
        pipe.ltrim(self.dead_key, 0, DEAD_LETTERS_KEPT - 1)
        pipe.execute()
        logger.error("dead-lettered: %s", {k: v for k, v in entry.items() if k != "inputs"})


def give_back(exc: Exception, message_id: str) -> Reject:
    """The result store is away before a job could be claimed or counted: the message goes
    back to the broker (it comes back as a redelivery) instead of failing the job for it.
    Paused first, so a long outage is not a hot loop."""
    logger.warning("message %s: the result store is unavailable (%s); handing it back to "
                   "the broker", message_id, exc)
    time.sleep(GIVE_BACK_PAUSE_S)
    return Reject(exc, requeue=True)


def dead_row_reason(delivery: Delivery, row: int) -> str:
    return (f"the worker process died {delivery.blamed[row]} times while running this row "
            f"(deliveries: {delivery.count}); dead-lettered, not run again")


def too_many_reason(delivery: Delivery, limit: int) -> str:
    if delivery.count <= limit:  # the cap on deliveries taken but never run
        return (f"message {delivery.message_id} was taken {delivery.taken + 1} times "
                f"(over {TAKEN_FACTOR} x INFERQ_MAX_DELIVERIES={limit}) and never finished: "
                "its worker died each time; dead-lettered")
    return (f"message {delivery.message_id} was delivered {delivery.count} times "
            f"(INFERQ_MAX_DELIVERIES={limit}): its worker died each time; dead-lettered")


def run_suspect(deliveries: Deliveries, pool: ModelPool, served: Served,
                data: dict[str, Any], delivery: Delivery,
                describe: Callable[[int], dict[str, Any]]) -> Outcome:
    """A redelivered message's valid rows, one model call each; rows blamed too often are
    dead-lettered instead. ``describe(i)``: the jobs and row labels of merged row i."""
    rows = len(next(iter(data.values())))
    skip: dict[int, str] = {}
    for i in sorted(r for r in delivery.dead_rows() if r < rows):
        skip[i] = dead_row_reason(delivery, i)
        deliveries.dead_letter({
            "reason": skip[i], "message_id": delivery.message_id,
            "model": served.version.key, **describe(i), "deliveries": delivery.count,
            "history": delivery.history,
            "inputs": {k: np.asarray(v[i]).tolist() for k, v in data.items()}})
        pool.metrics.dead_lettered(served.version.manifest.name)
    future = served.batcher.submit_alone(
        data, skip, partial(deliveries.running, delivery), first=delivery.once_blamed())
    return future.result(timeout=pool.settings.visibility_timeout)


def dead_letter_message(deliveries: Deliveries, pool: ModelPool, delivery: Delivery,
                        task: str, model: str, job_ids: list[str]) -> str:
    """Record a whole message as dead (delivered too often); the reason its jobs fail with."""
    reason = too_many_reason(delivery, deliveries.max_deliveries)
    deliveries.dead_letter({"reason": reason, "message_id": delivery.message_id,
                            "task": task, "model": model, "jobs": job_ids,
                            "deliveries": delivery.count, "history": delivery.history})
    deliveries.done(delivery.message_id)
    for _ in job_ids:
        pool.metrics.dead_lettered(model)
    return reason
