"""Task messages put straight on a Redis broker's queue, without ``send_task``'s layers.

On a Redis broker Celery's ``send_task`` cost ~0.35 ms of producer CPU per message
besides the broker's round trip (routing, the producer pool, kombu's ``Producer`` and
its retry wrapper, the declare check, an ``AsyncResult``); measured in-process, a
one-job ``infer_many`` message: ~0.27-0.37 -> ~0.13-0.16 ms of CPU. The message is the one
Celery would send: built by Celery's own ``as_task_v2`` (the same headers, which the
worker and Flower read), serialized by the app's task serializer, published on the
anonymous exchange with the queue's name as routing key, as Celery does for a direct
exchange (Celery also copies ``argsrepr``/``kwargsrepr`` into the properties; nothing
reads them there). Other brokers, and processes where something listens to Celery's
publish signals (an instrumentation), keep ``send_task``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals
from kombu.exceptions import OperationalError
from kombu.serialization import dumps
from kombu.utils.json import dumps as json_dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import backoff, keys
from shared.celery_app import RELIABLE_REDIS

PERSISTENT = 2  # delivery mode, as Celery's default exchange sets it
# Broker errors a publish is retried on (kombu wraps a failed connect in OperationalError).
_DOWN = (OperationalError, RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True)
class Encoded:
    """A message as a Redis broker holds it: ``payload`` goes on the list ``key``;
    ``wake`` is its queue's wake marker (shared/redis_transport.py)."""

    key: str
    wake: str
    payload: str


def usable(app: Celery) -> bool:
    """The broker is Redis through inferq's transport, and no one hooks publishing."""
    transport = app.conf.broker_transport or ""
    return (transport == RELIABLE_REDIS
            and not signals.before_task_publish.receivers
            and not signals.after_task_publish.receivers)


class DirectPublisher:
    """Thread-safe: each publish takes a channel from a small stack (one per concurrent
    publisher, each with its own Redis connection) and gives it back."""

    def __init__(self, app: Celery):
        self.app = app
        self._serializer = app.conf.task_serializer
        self._free: list[Any] = []  # (connection, channel) pairs not in use
        self._lock = threading.Lock()
        self._encoder: tuple[Any, Any] | None = None  # the channel ``encode`` uses

    def send(self, name: str, task_id: str, kwargs: dict[str, Any], queue: str,
             retry_policy: dict[str, Any], headers: dict[str, str] | None = None,
             **options: Any) -> None:
        """One ``name`` message on ``queue``; ``options`` as ``send_task`` takes them
        (``argsrepr``, ``kwargsrepr``). Connection errors are retried as ``retry_policy``
        says, then raised as kombu's OperationalError, as ``send_task`` does."""
        parts = self._parts(name, task_id, kwargs, headers, options)
        retries = int(retry_policy.get("max_retries") or 0)
        for attempt in range(retries + 1):
            pair = None
            try:
                pair = self._take()
                channel = pair[1]
                channel.basic_publish(channel.prepare_message(*parts), exchange="",
                                      routing_key=queue)
            except _DOWN as exc:
                if pair is not None:
                    _close(pair)
                if attempt == retries:
                    raise OperationalError(str(exc)) from exc
                time.sleep(backoff.exponential(
                    attempt, float(retry_policy.get("interval_start", 0.1)) or 0.1,
                    float(retry_policy.get("interval_max", 1.0))))
                continue
            self._give_back(pair)
            return

    @property
    def ready(self) -> bool:
        """``encode`` and ``queue_keys`` do no I/O (the first call takes a channel)."""
        return self._encoder is not None

    def encode(self, name: str, task_id: str, kwargs: dict[str, Any], queue: str,
               headers: dict[str, str] | None = None, **options: Any) -> Encoded:
        """The message ``send`` would put on ``queue``, for a caller that pushes it itself
        (the API's submit script, api/submitter.py); no I/O after the first call."""
        channel = self._encoding_channel()
        message = channel.prepare_message(*self._parts(name, task_id, kwargs, headers,
                                                       options))
        channel._inplace_augment_message(message, "", queue)
        priority = channel._get_message_priority(message, reverse=False)
        return Encoded(channel._q_for_pri(queue, priority), keys.wake(queue),
                       json_dumps(message))

    def queue_keys(self, queue: str) -> list[str]:
        """The Redis lists holding ``queue``'s messages, one per priority step."""
        channel = self._encoding_channel()
        return [channel._q_for_pri(queue, step) for step in channel.priority_steps]

    def _encoding_channel(self) -> Any:
        """A channel kept for ``encode``: only its message methods are used."""
        if self._encoder is None:
            self._encoder = self._take()
        return self._encoder[1]

    def _parts(self, name: str, task_id: str, kwargs: dict[str, Any],
               headers: dict[str, str] | None, options: dict[str, Any]) -> tuple[Any, ...]:
        """``prepare_message``'s arguments: the message Celery's ``as_task_v2`` builds."""
        message = self.app.amqp.as_task_v2(task_id, name, (), kwargs, ignore_result=None,
                                           reply_to=self.app.thread_oid, **options)
        content_type, encoding, body = dumps(message.body, serializer=self._serializer)
        message.headers.update(headers or {})
        properties = {**message.properties, "delivery_mode": PERSISTENT}
        return body, None, content_type, encoding, message.headers, properties

    def _take(self) -> tuple[Any, Any]:
        with self._lock:
            if self._free:
                return self._free.pop()  # type: ignore[no-any-return]
        connection = self.app.connection_for_write()
        try:  # one try here: the retries are the loop's, as the policy says
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                         interval_max=0)
            return connection, connection.default_channel
        except BaseException:
            _close((connection, None))
            raise

    def _give_back(self, pair: tuple[Any, Any]) -> None:
        with self._lock:
            self._free.append(pair)


def _close(pair: tuple[Any, Any]) -> None:
    with contextlib.suppress(Exception):  # a broken connection may fail to close: dropped
        pair[0].release()
