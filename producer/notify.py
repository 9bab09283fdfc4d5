"""Waits woken by the result's publish, for an event loop (the API's, ``AsyncClient``'s).

The asyncio twin of ``producer/waiter.py``: one subscriber connection and one listener
task per process. Two ways in:

- ``expect``: a job this process is about to send with its reply channel
  (``reply_channel``): the worker publishes each message's results there in one message,
  so a ``POST …/jobs?wait=`` costs no subscription and no read; the result arrives with
  the wake-up.
- ``watching``: any job (``GET /v1/jobs/{id}?wait=``): the request subscribes to its
  job's result channel, waits for Redis's confirmation, re-reads the job, then sleeps
  until a message arrives on the channel.

Either way a waiting request holds no thread, and a re-read every ``RECHECK_S`` is the
safety net should a message ever be missed (a reconnect, a redelivery elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from shared.results import read_reply

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


class Reply:
    """The encoded result of one job sent with the reply channel, once it arrives."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.value: bytes | None = None

    async def next(self, timeout: float) -> bytes | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.arrived.wait(), timeout)
        self.arrived.clear()
        value, self.value = self.value, None
        return value


class Notifier:
    def __init__(self, url: str, reply_channel: str, kept: int = 10_000):
        self._redis: Any = aioredis.Redis.from_url(url, socket_connect_timeout=1.0)
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._watches: dict[bytes, list[_Watch]] = {}
        self._starting = asyncio.Lock()
        self.reply_channel = reply_channel.encode()
        self._replies: dict[str, Reply] = {}
        self._kept = kept  # replies expected at most; the oldest unclaimed are dropped
        self._replying = asyncio.Event()  # the reply channel's subscription is confirmed

    def expect(self, job_id: str) -> Reply:
        """Register before sending: the reply may come before the sender returns."""
        reply = self._replies[job_id] = Reply()
        if len(self._replies) > self._kept:  # never waited for: its result stays readable
            self._replies.pop(next(iter(self._replies)))
        return reply

    def expected(self, job_id: str) -> Reply | None:
        """The reply ``expect`` registered for ``job_id`` (still registered)."""
        return self._replies.get(job_id)

    async def read(self, key: bytes) -> bytes | None:
        """One key's value, read on this loop (no thread)."""
        value: bytes | None = await self._redis.get(key)
        return value

    def forget(self, job_id: str) -> None:
        self._replies.pop(job_id, None)

    async def replying(self) -> bool:
        """Whether replies can be received (subscribed and confirmed, waited for once)."""
        if self._replying.is_set() and self._task is not None and not self._task.done():
            return True
        try:
            await self._ensure()
            await asyncio.wait_for(self._replying.wait(), RECHECK_S)
        except Exception as exc:  # noqa: BLE001 - the long poll re-reads instead
            logger.debug("reply channel unavailable (%s); long polls re-read", exc)
        return self._replying.is_set()

    async def _ensure(self) -> None:
        async with self._starting:  # two long polls at once must not start two listeners
            if self._task is not None and not self._task.done():
                return
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
            pubsub = self._redis.pubsub()
            self._replying.clear()
            await pubsub.subscribe(_IDLE, self.reply_channel, *self._watches)
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
                self._replying.clear()
                for watches in self._watches.values():
                    for w in watches:
                        w.confirmed.set()
                return
            if message is None:
                continue
            if message.get("channel") == self.reply_channel:
                self._reply(message)
                continue
            for w in list(self._watches.get(message.get("channel"), ())):
                if message["type"] == "subscribe":
                    w.confirmed.set()
                elif message["type"] == "message":
                    w.changed.set()

    def _reply(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            self._replying.set()
            return
        if message["type"] != "message":
            return
        try:
            replies = read_reply(message["data"])
        except ValueError as exc:  # a foreign message on our channel
            logger.warning("reply channel: an unreadable message ignored (%s)", exc)
            return
        for job_id, value in replies:
            reply = self._replies.get(job_id)
            if reply is not None:
                reply.value = value
                reply.arrived.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
            await self._redis.aclose()
