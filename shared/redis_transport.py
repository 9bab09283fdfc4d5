"""kombu's Redis transport with a reliable fetch: no message is lost between taking it
off a queue and recording it as unacked.

kombu's own transport pops a message with ``BRPOP`` and records it as unacked in a second
round trip; a worker killed between the two loses the message (about one kill in seven
under load, measured). Here one Lua script moves the message from the first non-empty queue
(high-priority queues first) into kombu's unacked records, so a message is always either on
a queue or recorded. Redis cannot block inside a script, so idle consumers block on a *wake
marker* per queue (a one-element list that every publish and restore pushes) and fetch when
it fires, as BullMQ's workers do; while messages flow, consumers fetch back to back. The
wait and its fetch are one write: Redis runs a blocked client's next command as the wait
ends, so a woken consumer has its message without a second round trip. A lost marker costs
at most ``brpop_timeout`` (1 s): a consumer fetches after every wait.

Each consuming channel is an *owner*: the fetch records which owner holds each message, and
a heartbeat keeps the owner's time fresh. The restore sweep (kombu's ``restore_visible``,
run by every worker every few seconds) first marks every message of an owner silent for
``owner_dead_after`` seconds as overdue, so a killed worker's messages come back in
seconds, not after the visibility timeout. Acks, restores and the visibility timeout work
as in kombu, so Celery's acks-late and ``reject_on_worker_lost`` keep their meaning.

A queue entry that is not a kombu message is moved to the ``_inferq.garbage`` list and
handed to the consumer as a refused message (header ``inferq_refused``), which the worker
dead-letters: nothing a producer puts on a queue can stop a worker. Design notes:
docs/design.md ("Reliable fetch on Redis").
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import NoScriptError

from shared import keys
from shared.envelope import is_message, stand_in
from shared.redis_heartbeat import Heartbeat
from shared.redis_qos import GARBAGE_KEPT, QoS
from shared.redis_scripts import FETCH, PUT

logger = logging.getLogger(__name__)

WAKE_TTL_MS = 60_000  # a marker only matters for a moment; queues come and go (replies)


_FETCH_SHA = hashlib.sha1(FETCH.encode()).hexdigest()
_PUT_SHA = hashlib.sha1(PUT.encode()).hexdigest()


def _wake_commands(queue: str) -> list[tuple[Any, ...]]:
    """Push ``queue``'s wake marker: one element at most, gone after a minute unused."""
    key = keys.wake(queue)
    return [("lpush", key, "1"), ("ltrim", key, 0, 0), ("pexpire", key, WAKE_TTL_MS)]


def _wake(pipe: Any, queue: str) -> None:
    for command, *args in _wake_commands(queue):
        getattr(pipe, command)(*args)


class Channel(kombu_redis.Channel):
    """A Redis channel whose consumers fetch with :data:`FETCH` (no loss window)."""

    QoS = QoS
    #: queues whose name ends so are tried before the others (inferq's ``.high``)
    priority_suffix = ""
    #: seconds without a heartbeat after which an owner's messages are restored
    owner_dead_after = 10.0
    #: prefix of this deployment's bookkeeping keys (unacked records, owners, consumers,
    #: garbage): deployments sharing a database never sweep each other's messages
    state_prefix = ""
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options, "priority_suffix", "owner_dead_after",
        "state_prefix")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("inferq's Redis transport does not support global_keyprefix; "
                             "use INFERQ_QUEUE_PREFIX or another database")
        p = self.state_prefix
        self.unacked_key = p + self.unacked_key
        self.unacked_index_key = p + self.unacked_index_key
        self.unacked_mutex_key = p + self.unacked_mutex_key
        self.owner_key, self.consumers_key, self.garbage_key = (
            p + keys.OWNER, p + keys.CONSUMERS, p + keys.GARBAGE)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        # Tags: 80 random bits per channel and a counter (a uuid4 per fetch was a syscall)
        self._tag_prefix, self._tags = uuid.uuid4().hex[:20], itertools.count()
        self.recorded: set[str] = set()  # tags FETCH recorded, until QoS.append sees them
        self._fetch_next = True  # else wait on the wake markers first
        self._fetching: list[str] | None = None  # the queues of the fetch in flight
        self._waking = False  # the fetch in flight waits behind a BRPOP on the markers
        self._eval = False  # the script cache lost FETCH: send the script itself once
        self._heartbeat: Heartbeat | None = None
        self._fetch_script = self.client.register_script(FETCH)  # loads it when missing
        self._no_ack_queues: set[str] = set()
        self._orphans: list[str] = []  # tags of fetches whose reply was lost: restore them
        self._plain = False  # the BRPOP in flight is kombu's own (a no-ack consumer)

    # -- consuming -----------------------------------------------------------------------
    def _new_tag(self) -> str:
        return f"{self._tag_prefix}{next(self._tags):x}"

    def _ordered_queues(self) -> list[str]:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if self.priority_suffix:
            queues = sorted(queues, key=lambda q: not q.endswith(self.priority_suffix))
        return queues

    def _fetch_keys(self, queues: list[str]) -> list[str]:
        names = [self.unacked_key, self.unacked_index_key, self.owner_key, self.consumers_key]
        for queue in queues:
            names += [self._q_for_pri(queue, pri) for pri in self.priority_steps]
            names.append(keys.wake(queue))
        return names

    def _fetch_args(self, tag: str) -> list[Any]:
        return [time(), self.owner, tag, len(self.priority_steps), keys.WAKE_PREFIX, WAKE_TTL_MS]

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:  # nothing to record: kombu's BRPOP loses nothing that matters
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(self, max(0.2, self.owner_dead_after / 5))

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
        return result

    def _on_connection_disconnect(self, connection: Any) -> None:
        if self._in_poll is connection and self._fetching is not None:
            self._orphans.append(self._fetching[0])  # the script may have run: its reply
            self._fetching = None  # is gone with the connection
        super()._on_connection_disconnect(connection)

    def _restore_orphans(self) -> None:
        """Put back what a fetch whose reply was lost may have recorded (a no-op for a tag
        the script never recorded); else it would wait out the visibility timeout while
        this live owner keeps it from the dead-consumer sweep."""
        while self._orphans:
            tag = self._orphans[0]
            self.qos.restore_by_tag(tag)  # a connection error leaves it for the next try
            self._orphans.pop(0)
            logger.warning("restored message %s: its fetch reply was lost", tag)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._orphans:
            self._restore_orphans()
        self._plain = bool(self._no_ack_queues.intersection(self.active_queues))
        if self._plain:
            super()._brpop_start(timeout)
            return
        queues = self._ordered_queues()
        if not queues:
            return
        self._start_heartbeat()
        names = self._fetch_keys(queues)
        tag = self._new_tag()
        script = ("EVAL", FETCH) if self._eval else ("EVALSHA", _FETCH_SHA)
        commands: list[list[Any]] = [[*script, len(names), *names, *self._fetch_args(tag)]]
        self._fetching = [tag, *queues]
        self._waking = not self._fetch_next
        if self._waking:  # wait on the markers; Redis runs the fetch once the wait ends
            commands.insert(0, ["BRPOP", *[keys.wake(q) for q in queues],
                                timeout if timeout is not None else (self.brpop_timeout or 1)])
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        connection.send_packed_command(connection.pack_commands(commands))

    def _brpop_read(self, **options: Any) -> bool:
        if self._plain:
            return bool(super()._brpop_read(**options))
        fetching, self._fetching = self._fetching, None
        waking, self._waking = self._waking, False
        try:
            if fetching is None:
                raise Empty()
            try:
                if waking:  # woken by a marker, or the wait timed out: the fetch ran next
                    self._woken(**options)
                reply = self.client.parse_response(self.client.connection, "EVALSHA",
                                                   **options)
            except self.connection_errors:
                self._orphans.append(fetching[0])
                self.client.connection.disconnect()
                raise
            except NoScriptError:  # the script never ran: send it itself, at once (a
                self._eval = self._fetch_next = True  # marker that fired is spent)
                raise Empty() from None
            except self.ResponseError:
                logger.exception("fetching from Redis failed")
                self._orphans.append(fetching[0])
                self._fetch_next = False
                raise Empty() from None
            self._eval = False
            # fetch again while messages wait, else wait on the markers
            self._fetch_next = bool(reply) and bool(reply[2])
            if not reply:
                raise Empty()
            tag, queues = fetching[0], fetching[1:]
            if self._closing:  # taken as the wait ended: back on its queue
                self.qos.restore_by_tag(tag)
                raise Empty()
            if waking:
                self._restamp(tag)
            queue = queues[int(reply[0])]
            self._queue_cycle.rotate(queue)
            self._deliver_fetched(reply[1], tag, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _woken(self, **options: Any) -> None:
        """The reply of the wait on the markers; the fetch's follows it."""
        try:
            self.client.parse_response(self.client.connection, "BRPOP", **options)
        except self.ResponseError:  # a marker of another type, say: the fetch still ran
            logger.exception("waiting on the wake markers failed")

    def _restamp(self, tag: str) -> None:
        """The fetch's arguments were written before the wait: after a long one, its
        time in the unacked index (the visibility timeout counts from it) is now's.
        Exact to within 1% of the timeout, or 1 s; a round trip only after such a wait."""
        waited = monotonic() - float(self._brpop_sent_at or 0.0)
        if waited <= min(1.0, self.visibility_timeout / 100):
            return
        try:
            self.client.zadd(self.unacked_index_key, {tag: time()})
        except self.connection_errors:  # delivered all the same; it may come back early
            logger.warning("could not restamp message %s after a long wait", tag)

    def _fetch(self, client: Any, queues: list[str], tag: str) -> Any:
        """One :data:`FETCH` now, on ``client``."""
        if not queues:
            return None
        return self._fetch_script(keys=self._fetch_keys(queues), args=self._fetch_args(tag),
                                  client=client)

    def _deliver_fetched(self, raw: bytes, tag: str, queue: str) -> None:
        """Hand a recorded message to its consumer; an entry that is not one is refused."""
        try:
            payload = loads(bytes_to_str(raw))
            valid = is_message(payload)
        except Exception:  # kombu's loads raises many kinds (__type__ hooks, nesting)
            valid = False
        if not valid:
            self._refuse(raw, tag, queue, "the queue entry is not a kombu message (JSON "
                         "with properties and delivery_info)")
            return
        payload["properties"]["delivery_tag"] = tag
        self.recorded.add(tag)
        try:
            self.connection._deliver(payload, queue)
        except Exception as exc:
            if tag in self.qos._delivered:
                raise  # the consumer holds it: acked, rejected or restored as usual
            self._refuse(raw, tag, queue, f"kombu cannot read the message: "
                         f"{type(exc).__name__}: {exc}")
        finally:
            self.recorded.discard(tag)

    def _refuse(self, raw: bytes, tag: str, queue: str, reason: str) -> None:
        """Keep a garbage entry in the garbage list, drop its record, and give the consumer
        a stand-in message saying so (the worker dead-letters it and acks)."""
        logger.error("queue %s: refused an entry of %d bytes: %s", queue, len(raw), reason)
        self._keep_garbage(raw, tag)
        refused = stand_in(reason, len(raw), {
            "delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": queue}},
            inferq_kept_in=self.garbage_key)
        self.recorded.add(tag)
        try:
            self.connection._deliver(refused, queue)
        finally:
            self.recorded.discard(tag)

    def _keep_garbage(self, raw: bytes, tag: str) -> None:
        """Move a fetched entry that is not a message from its record to the garbage list."""
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.lpush(self.garbage_key, raw).ltrim(self.garbage_key, 0, GARBAGE_KEPT - 1)
            self.qos._remove_from_indices(tag, pipe).execute()

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """Synchronous get: through :data:`FETCH` too, unless nothing is acked."""
        if no_ack:
            return super().basic_get(queue, no_ack, **kwargs)
        self._start_heartbeat()
        tag = self._new_tag()
        with self.conn_or_acquire() as client:
            reply = self._fetch(client, [queue], tag)
        if not reply:
            return None
        try:
            payload = loads(bytes_to_str(reply[1]))
            valid = is_message(payload)
        except Exception:
            valid = False
        if not valid:
            self._keep_garbage(reply[1], tag)
            return None
        payload["properties"]["delivery_tag"] = tag
        message = self.Message(payload, channel=self)
        self.recorded.add(tag)
        try:
            self.qos.append(message, tag)
        finally:
            self.recorded.discard(tag)
        return message

    # -- publishing: every message, and every restored one, wakes a consumer -------------
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        batch = kwargs.get("_publish_batch")
        if batch is not None:
            super()._put(queue, message, **kwargs)
            for command, *args in _wake_commands(queue):
                batch.add(command, *args)
            return
        if self._expires and queue in self._expires:  # rare (reply queues): kombu's way
            super()._put(queue, message, **kwargs)
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                _wake(pipe, queue)
                pipe.execute()
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        command = ("EVALSHA", _PUT_SHA, 2, key, keys.wake(queue), dumps(message), WAKE_TTL_MS)
        with self.conn_or_acquire() as client:  # one command, as kombu's bare LPUSH
            try:
                client.execute_command(*command)
            except NoScriptError:
                client.script_load(PUT)
                client.execute_command(*command)

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        for queue in self._lookup(exchange, routing_key):
            _wake(pipe, queue)

    def _purge(self, queue: str) -> int:
        with self.conn_or_acquire() as client:
            client.delete(keys.wake(queue))
        return int(super()._purge(queue))

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()  # its owner is swept once silent; restore goes first
        super().close()


class Transport(kombu_redis.Transport):
    """``broker_transport = "shared.redis_transport:Transport"`` with a redis:// URL."""

    Channel = Channel
    driver_name = "redis"
