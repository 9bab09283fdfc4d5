"""The heartbeat of a consumer of inferq's Redis transport: a daemon thread that keeps
its owner's time fresh, so the restore sweep can tell a live consumer from a dead one
(shared/redis_transport.py)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import redis

from shared.redis_scripts import BEAT

if TYPE_CHECKING:
    from shared.redis_transport import Channel

logger = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread that keeps one owner's time fresh in the consumers set."""

    def __init__(self, channel: Channel, interval: float):
        self.owner = channel.owner
        self.consumers_key = channel.consumers_key
        self.interval = interval
        # Its own connection, with timeouts: a half-open socket or a pool busy with acks
        # must not silence a live owner (its messages would be restored while it works).
        timeout = max(1.0, interval * 2)
        params = {**channel._connparams(), "socket_timeout": timeout, "max_connections": 2}
        if "path" not in params:  # TCP, not a unix socket
            params.update(socket_keepalive=True, socket_connect_timeout=timeout)
        self._client = channel.Client(connection_pool=redis.ConnectionPool(**params))
        self._beat = self._client.register_script(BEAT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat(keys=[self.consumers_key], args=[self.owner])
            except Exception as exc:  # the broker is away: the next beat tries again
                logger.debug("heartbeat of %s failed: %s", self.owner, exc)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._client.connection_pool.disconnect()
