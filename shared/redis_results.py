"""The Redis result store: Celery's Redis backend, without its subscription per send.

Celery's backend subscribes to every task's result channel when the task is sent
(``on_task_call``), for an ``AsyncResult.get()`` that may follow, and unsubscribes when the
result arrives: two extra round trips per job, and every result decoded a second time in
the producer. inferq's producers wait through their own listeners (producer/waiter.py,
producer/notify.py); ``AsyncResult.get()`` still works, subscribing when it is called.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend as CeleryRedisBackend

URL_PREFIX = "shared.redis_results:RedisBackend+"


class RedisBackend(CeleryRedisBackend):  # type: ignore[misc]
    def on_task_call(self, producer: Any, task_id: str) -> None:
        """No subscription at send time (see the module's docstring)."""
