"""What keeps one tenant or one flood from hurting the rest: body caps, per-tenant rate
limits, and backpressure on a model's queue depth."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from celery import Celery

from shared.queues import PRIORITIES, queue_name
from shared.settings import Settings

logger = logging.getLogger(__name__)

DEPTH_TTL = 1.0  # seconds a queue depth is reused; a flood is caught within a second


class TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes answers 413, declared or streamed."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        seen = 0
        over = False  # the body went over: whatever the app answers, the client gets 413
        answered = False

        async def limited_receive() -> dict:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise TooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal answered
            if over:  # the app turned TooLarge into its own answer (FastAPI: a 400)
                if not answered:
                    answered = True
                    await _too_large(send, self.limit)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except* TooLarge:  # except*: middleware task groups wrap it in an ExceptionGroup
            if not answered:
                answered = True
                await _too_large(send, self.limit)


async def _too_large(send: Any, limit: int) -> None:
    body = (b'{"detail":"request body over the limit of %d bytes '
            b'(INFERQ_API_MAX_BODY_BYTES); send fewer rows per request"}' % limit)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class QueueDepth:
    """Messages waiting in each model's queues (normal and high), read from the broker at
    most once a second."""

    def __init__(self, settings: Settings, app: Celery):
        self.settings = settings
        self.app = app
        self._lock = threading.Lock()  # held while reading the broker
        self._count_lock = threading.Lock()  # never held across I/O: the event loop takes it
        self._conn: Any = None
        self._cache: dict[str, tuple[float, int]] = {}
        self._added: dict[str, int] = {}  # queued by this process since the cached read

    def limit(self, model: str) -> int:
        return self.settings.api_queue_limits.get(model, self.settings.api_queue_limit)

    def depth(self, model: str) -> int:
        now = time.monotonic()
        cached = self._cache.get(model)
        if cached and now - cached[0] < DEPTH_TTL:
            return cached[1]
        with self._lock:  # one read per model and second, however many requests ask
            cached = self._cache.get(model)
            if cached and time.monotonic() - cached[0] < DEPTH_TTL:
                return cached[1]
            with self._count_lock:
                before = self._added.get(model, 0)
            depth = sum(self._read(queue_name(self.settings, model, p)) for p in PRIORITIES)
            with self._count_lock:  # what was added during the read may not be in it
                self._cache[model] = (time.monotonic(), depth)
                self._added[model] = self._added.get(model, 0) - before
        return depth

    def estimate(self, model: str) -> int:
        """``depth`` plus what this process queued since reading it: a burst within the
        cache's second cannot pass the limit unseen."""
        depth = self.depth(model)
        return depth + self._added.get(model, 0)

    def added(self, model: str, messages: int) -> None:
        with self._count_lock:
            self._added[model] = self._added.get(model, 0) + messages

    def _read(self, name: str) -> int:
        from amqp.exceptions import ChannelError as AmqpChannelError
        from kombu.exceptions import ChannelError, OperationalError

        if self._conn is None:
            self._conn = self.app.connection_for_write()
            # kombu's default retry interval is 2 s: a broker outage would hold every POST
            # (serialised on the lock) that long before its 503. Fail fast instead, and keep
            # no connection that never connected (its next use retries for seconds).
            try:
                self._conn.ensure_connection(max_retries=1, interval_start=0.1,
                                             interval_step=0.2, interval_max=0.5, timeout=2)
            except Exception:
                self._drop()
                raise
        try:
            ok = self._conn.default_channel.queue_declare(queue=name, passive=True)
            return int(ok.message_count)
        except (ChannelError, AmqpChannelError):
            self._drop()
            return 0  # no such queue yet: nothing waiting
        except Exception as exc:
            lost = isinstance(exc, self._conn.connection_errors)
            self._drop()
            if lost:  # e.g. redis.ConnectionError from a Redis broker: the broker's fault,
                raise OperationalError(f"broker: {exc}") from exc  # not the result store's
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                logger.debug("closing the depth connection failed", exc_info=True)

    def retry_after(self, model: str, depth: int) -> int:
        """Seconds to suggest: the excess over the limit at a guessed 1,000 msgs/s, 1-60."""
        excess = depth - self.limit(model)
        return max(1, min(60, math.ceil(excess / 1000)))

    def close(self) -> None:
        with self._lock:
            self._drop()
