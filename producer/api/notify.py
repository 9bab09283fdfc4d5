"""Long polls woken by the result's publish, for the API's event loop.

The asyncio twin of ``producer/waiter.py``: one subscriber connection and one listener
task per API process. A long-polling request subscribes to its job's result channel,
waits for Redis's confirmation, re-reads the job, then sleeps until a message arrives on
the channel (or ``RECHECK_S`` passes), so a waiting request holds no thread and makes no
reads while its job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

RECHECK_S = 0.5
_IDLE = b"inferq-api-idle"


class _Watch:
    def __init__(self) -> None:
        self.confirmed = asyncio.Event()
        self.changed = asyncio.Event()

    async def next(self, timeout: float) -> None:
        """Until the next publish on the channel, or ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()


class Notifier:
    def __init__(self, url: str):
        self._redis: Any = aioredis.Redis.from_url(url, socket_connect_timeout=1.0)
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._watches: dict[bytes, list[_Watch]] = {}
        self._starting = asyncio.Lock()

    async def _ensure(self) -> None:
        async with self._starting:  # two long polls at once must not start two listeners
            if self._task is not None and not self._task.done():
                return
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
            pubsub = self._redis.pubsub()
            await pubsub.subscribe(_IDLE, *self._watches)
            self._pubsub = pubsub
            self._task = asyncio.create_task(self._listen(pubsub))

    @contextlib.asynccontextmanager
    async def watching(self, key: bytes) -> AsyncIterator[_Watch]:
        """Subscribed to ``key``'s channel for the block (confirmed on entry, else the
        caller simply re-reads every ``RECHECK_S``)."""
        watch = _Watch()
        first = key not in self._watches
        self._watches.setdefault(key, []).append(watch)
        try:
            try:
                await self._ensure()
                if first:
                    await self._pubsub.subscribe(key)
                else:
                    watch.confirmed.set()
                await asyncio.wait_for(watch.confirmed.wait(), RECHECK_S)
            except Exception as exc:  # noqa: BLE001 - fall back to re-reading
                logger.debug("subscribe failed (%s); the long poll re-reads instead", exc)
            yield watch
        finally:
            waiting = self._watches.get(key, [])
            if watch in waiting:
                waiting.remove(watch)
            if not waiting:
                self._watches.pop(key, None)
                with contextlib.suppress(Exception):
                    if self._pubsub is not None:
                        await self._pubsub.unsubscribe(key)

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect on the next watch
                logger.warning("result notifier: %s; long polls re-read until it is back",
                               type(exc).__name__)
                for watches in self._watches.values():
                    for w in watches:
                        w.confirmed.set()
                return
            if message is None:
                continue
            for w in list(self._watches.get(message.get("channel"), ())):
                if message["type"] == "subscribe":
                    w.confirmed.set()
                elif message["type"] == "message":
                    w.changed.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
            await self._redis.aclose()
