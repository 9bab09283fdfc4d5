"""Waiting for results by Redis pub/sub, many waiting threads on one connection.

Two ways in. ``wait``: any job, by its result key's channel (subscribe per job).
``wait_reply``: jobs this process sent with a reply channel (``producer/coalesce.py``);
the worker publishes each message's results there in one message, so a job costs no
subscription and no read. Results that arrive before their ``wait_reply`` are kept
(``EARLY_MAX``) for it.

Celery's Redis backend publishes every stored result on a channel named after its key.
One listener thread per process reads that connection; a waiting thread subscribes to
its job's channel (sending on the shared connection under a lock), waits until Redis
confirms the subscription, reads the key once (a result stored before the subscription
is not missed), then sleeps on an event until the listener hands it the result. A
re-read every ``RECHECK_S`` is the safety net should a message ever be missed.

A store that cannot be reached (a restart, a failover) does not end a wait: the re-reads
go on until the result comes or the wait's deadline passes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.results import read_reply

logger = logging.getLogger(__name__)

RECHECK_S = 0.5
EARLY_MAX = 10_000  # replies kept for a wait_reply that has not started yet ...
EARLY_MAX_BYTES = 64 * 2**20  # ... at most this many bytes of them ...
EARLY_TTL_S = 60.0  # ... for at most this long
_IDLE = b"inferq-waiter-idle"  # always subscribed, so reads never busy-loop


@dataclass
class _Waiter:
    confirmed: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    value: bytes | None = None


def _read_or(value: Any, read: Callable[[], Any]) -> Any:
    """``read()``; while the store cannot be reached, ``value`` (the next re-read retries)."""
    try:
        return read()
    except (RedisConnectionError, RedisTimeoutError) as exc:
        logger.debug("result store unreachable, re-reading in %s s: %s", RECHECK_S, exc)
        return value


def _await(me: _Waiter, value: Any, read: Callable[[], Any], is_done: Callable[[Any], bool],
           decode: Callable[[bytes], Any], deadline: float) -> Any:
    """Until ``value`` is done or the deadline: take what the listener hands over, else
    re-read every ``RECHECK_S``."""
    while not is_done(value):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if me.arrived.wait(min(left, RECHECK_S)):
            me.arrived.clear()
            assert me.value is not None
            value = decode(me.value)
        else:
            value = _read_or(value, read)
    return value


class ResultWaiter:
    def __init__(self, redis: Any, reply_channel: bytes | None = None):
        self._redis = redis
        self._lock = threading.Lock()  # guards the dicts and every send on the connection
        self._waiters: dict[bytes, list[_Waiter]] = {}
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self.reply_channel = reply_channel
        self._reply_ready = threading.Event()
        self._replies: dict[str, _Waiter] = {}
        self._early: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._early_bytes = 0

    def _try_start(self) -> bool:
        """Start (or restart) the listener; False if Redis cannot be reached now (waits
        then fall back to re-reading every RECHECK_S, and the next wait tries again)."""
        try:
            self._start()
            return True
        except Exception as exc:  # noqa: BLE001 - any connection problem
            logger.warning("result listener cannot start: %s", type(exc).__name__)
            return False

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
        self._pubsub = self._redis.pubsub()
        self._pubsub.subscribe(_IDLE)
        if self.reply_channel is not None:
            self._pubsub.subscribe(self.reply_channel)
        for channel in self._waiters:  # after a reconnect
            self._pubsub.subscribe(channel)
        self._thread = threading.Thread(target=self._listen, name="inferq-result-waiter",
                                        daemon=True)
        self._thread.start()

    def wait(self, key: bytes, read: Callable[[], Any], is_done: Callable[[Any], bool],
             decode: Callable[[bytes], Any], timeout: float) -> Any:
        """``read()`` the key's value until ``is_done``; woken by its publish. Returns the
        last value read or received (maybe not done, at the timeout)."""
        deadline = time.monotonic() + timeout
        me = _Waiter()
        with self._lock:
            if self._try_start() and key not in self._waiters:
                try:
                    self._pubsub.subscribe(key)
                except Exception:  # noqa: BLE001 - the re-reads still find the result
                    logger.debug("subscribe failed", exc_info=True)
                    me.confirmed.set()
            else:
                me.confirmed.set()
            self._waiters.setdefault(key, []).append(me)
        try:
            me.confirmed.wait(min(timeout, RECHECK_S))
            return _await(me, _read_or(None, read), read, is_done, decode, deadline)
        finally:
            with self._lock:
                waiting = self._waiters.get(key, [])
                if me in waiting:
                    waiting.remove(me)
                if not waiting and key in self._waiters:
                    del self._waiters[key]
                    with contextlib.suppress(Exception):  # a dead connection forgets it
                        self._pubsub.unsubscribe(key)

    def ready(self, reply_channel: bytes, timeout: float = 2.0) -> bool:
        """Subscribed to ``reply_channel`` (confirmed): replies from now on are not missed."""
        with self._lock:
            if self.reply_channel is None:
                self.reply_channel = reply_channel
                if self._thread is not None and self._thread.is_alive():
                    self._pubsub.subscribe(reply_channel)
            started = self._try_start()
        return started and self.reply_channel == reply_channel and \
            self._reply_ready.wait(timeout)

    def wait_reply(self, job_id: str, read: Callable[[], Any], is_done: Callable[[Any], bool],
                   decode: Callable[[bytes], Any], timeout: float) -> Any:
        """A job sent with this waiter's reply channel: its result as the worker published
        it (re-read from the store every ``RECHECK_S`` as the safety net)."""
        deadline = time.monotonic() + timeout
        me = _Waiter()
        with self._lock:
            self._try_start()  # a listener lost in an outage comes back here
            found = self._early.pop(job_id, None)
            early = None if found is None else found[1]
            if early is not None:
                self._early_bytes -= len(early)
            if early is None:
                self._replies[job_id] = me
        try:
            if early is not None:
                return decode(early)
            return _await(me, None, read, is_done, decode, deadline)
        finally:
            with self._lock:
                self._replies.pop(job_id, None)

    def _on_reply(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            replies = read_reply(data)
        except ValueError as exc:  # a foreign message on our channel: not a reason to stop
            logger.warning("reply channel: an unreadable message ignored (%s)", exc)
            return
        for job_id, value in replies:
            with self._lock:
                waiter = self._replies.get(job_id)
                if waiter is None:  # kept for a wait that has not started (bounded)
                    self._early[job_id] = (now, value)
                    self._early_bytes += len(value)
                    while self._early and (len(self._early) > EARLY_MAX
                                           or self._early_bytes > EARLY_MAX_BYTES
                                           or next(iter(self._early.values()))[0]
                                           < now - EARLY_TTL_S):
                        self._early_bytes -= len(self._early.popitem(last=False)[1][1])
            if waiter is not None:
                waiter.value = value
                waiter.arrived.set()

    def _listen(self) -> None:
        pubsub = self._pubsub
        while True:
            try:
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._dispatch(message)
            except Exception as exc:  # noqa: BLE001 - connection lost: the next wait restarts
                logger.warning("result listener stopped (%s); waits re-read until the next "
                               "one restarts it", type(exc).__name__)
                with self._lock:
                    self._thread = None
                    self._reply_ready.clear()
                    for waiting in self._waiters.values():
                        for w in waiting:
                            w.confirmed.set()  # they re-read the key meanwhile
                return

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel: bytes = message["channel"]
        if channel == self.reply_channel:
            if message["type"] == "subscribe":
                self._reply_ready.set()
            elif message["type"] == "message":
                self._on_reply(message["data"])
            return
        with self._lock:
            waiting = list(self._waiters.get(channel, ()))
        if message["type"] == "subscribe":
            for w in waiting:
                w.confirmed.set()
        elif message["type"] == "message":
            for w in waiting:
                w.value = message["data"]
                w.arrived.set()
