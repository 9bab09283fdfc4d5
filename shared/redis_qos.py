"""Acks for inferq's Redis transport (shared/redis_transport.py): kombu's ack emulation,
where a message fetched by the transport's script is already recorded as unacked, the
restore sweep first hands back the messages of dead consumers, and a record that is not a
message is kept as garbage instead of stopping the sweep."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from shared.envelope import is_message
from shared.redis_scripts import SWEEP_DEAD

logger = logging.getLogger(__name__)

GARBAGE_KEPT = 10_000  # raw queue entries that were not messages, newest first


class QoS(kombu_redis.QoS):
    """kombu's ack emulation; a message fetched by :data:`FETCH` is already recorded."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.recorded:
            virtual.QoS.append(self, message, delivery_tag)  # in memory only
        else:
            super().append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        return super()._remove_from_indices(delivery_tag, pipe).hdel(self.channel.owner_key,
                                                                     delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        if not (self._vrestore_count % (interval or 1)):
            try:
                with self.channel.conn_or_acquire() as client:
                    marked = client.register_script(SWEEP_DEAD)(
                        keys=[self.channel.consumers_key, self.channel.owner_key,
                              self.unacked_index_key],
                        args=[self.channel.owner_dead_after])
            except self.channel.ResponseError:  # a full noeviction server, say
                logger.exception("sweeping dead consumers failed; the next sweep tries again")
                marked = 0
            if marked:
                logger.warning("restoring %d messages of consumers silent for over %s s",
                               marked, self.channel.owner_dead_after)
        super().restore_visible(start, num, interval)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """kombu's, but a record that is not a message (garbage fetched by a consumer that
        died before it could refuse it) is kept in the garbage list instead of raising."""

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if not raw:
                return
            try:
                message, exchange, routing_key = loads(bytes_to_str(raw))
                valid = is_message(message)
            except Exception:  # kombu's loads raises many kinds (__type__ hooks, nesting)
                valid = False
            if not valid:
                garbage = self.channel.garbage_key
                pipe.lpush(garbage, raw).ltrim(garbage, 0, GARBAGE_KEPT - 1)
                return
            self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)
