"""The SDK for asyncio code (FastAPI, aiohttp, Starlette backends): the Client's verbs,
awaited; a wait holds no thread.

``AsyncClient`` wraps a ``Client`` (validation, the model cache, publishing, the result
store) and adds what an event loop needs:

- **sending**: jobs submitted on the loop queue up per (model, priority); one task sends
  what is pending as one shared message (``producer/coalesce.py``) in a worker thread and
  sends again for jobs that arrived meanwhile: one thread hop per message, not per job;
- **waiting**: jobs go out with this process's reply channel, and the worker publishes
  their results there (``producer/notify.py``); a wait is an ``asyncio.Event``, woken with
  the result itself. A job sent elsewhere is waited for on its own result channel. Either
  way the key is re-read every ``RECHECK_S`` on the loop as a safety net (a redelivered
  job's result, a reconnect).

With a result store that cannot publish (the embedded default), waits poll it instead.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.bulk.chunks import check_fits
from producer.client import Client
from producer.coalesce import Coalescer, Item, take
from producer.notify import RECHECK_S, Notifier, Reply
from producer.publish import PUBLISH_RETRY, coerce_inputs, deadline_after, not_sent, wire_inputs
from shared import backoff, keys
from shared.queues import check_priority
from shared.results import is_final, status_of, to_result
from shared.schemas import JobResult, JobStatus
from shared.settings import Settings

if TYPE_CHECKING:
    from producer.bulk.batch import BatchHandle

_POLL_MAX_S = 0.05  # the longest pause between reads of a store that cannot publish


class AsyncClient:
    """One per process (per event loop); ``async with AsyncClient() as client: ...``.

    ``await client.submit(model, row)`` -> an ``AsyncJob``; ``await job.result()``.
    """

    def __init__(self, settings: Settings | None = None, *, client: Client | None = None):
        self.client = client or Client(settings)
        self.settings = self.client.settings
        store = self.client.store
        channel = keys.new_reply_channel() if store.claims.supported else None
        self.notifier = None if channel is None else \
            Notifier(self.settings.effective_result_backend(), channel)
        # The SDK records each job as queued before sending (mark): ``get`` knows it.
        self.coalescer = Coalescer(self.client, PUBLISH_RETRY, reply_to=channel)
        self._pending: dict[tuple[Any, ...], list[tuple[Item, asyncio.Future[None]]]] = {}
        self._sending: set[tuple[Any, ...]] = set()  # keys a sender task is serving
        self._senders: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening for results (pending sends finish first)."""
        if self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        if self.notifier is not None:
            await self.notifier.close()

    # -- submitting ----------------------------------------------------------------------
    async def submit(self, model: str, row: Any, *, job_id: str | None = None,
                     priority: str = "normal", expires_in: float | None = None) -> AsyncJob:
        """As ``Client.submit``: validated here, returns once the job is on the broker."""
        check_priority(priority)
        deadline = deadline_after(expires_in)
        version, ref = self.client.model(model)
        inputs = wire_inputs(coerce_inputs(version.manifest, row))
        check_fits(self.client.settings, inputs)
        job_id = job_id or uuid.uuid4().hex
        if self.coalescer.reply_to is not None:
            if await self.notifier.replying():  # type: ignore[union-attr]
                self.notifier.expect(job_id)  # type: ignore[union-attr]
            else:  # no listener: results are read from the store
                self.coalescer.reply_to = None
        try:
            await self._send(ref, Item(job_id, inputs, time.time(), deadline), priority)
        except BaseException:
            if self.notifier is not None:
                self.notifier.forget(job_id)
            raise
        return AsyncJob(self, job_id, ref.name)

    async def _send(self, ref: Any, item: Item, priority: str) -> None:
        key = (ref.name, ref.variant, ref.version, priority)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((item, done))
        if key not in self._sending:
            self._sending.add(key)
            task = asyncio.create_task(self._sender(key, ref, priority))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        await done

    async def _sender(self, key: tuple[Any, ...], ref: Any, priority: str) -> None:
        """Send what is pending for ``key`` until nothing is (one message at a time)."""
        try:
            while queue := self._pending.get(key):
                items = take([item for item, _ in queue], self.coalescer.max_bytes)
                waiting = queue[:len(items)]
                del queue[:len(items)]
                error: BaseException | None = None
                try:
                    await asyncio.to_thread(self.coalescer.send, ref, priority, items)
                except BaseException as exc:  # every submitter of the message hears it
                    error = exc
                for item, done in waiting:
                    if done.done():
                        continue
                    if error is None:
                        done.set_result(None)
                    else:
                        done.set_exception(not_sent(f"job {item.job_id} (model {ref.name})",
                                                    self.client, error))
                if isinstance(error, asyncio.CancelledError):
                    raise error
        finally:
            self._sending.discard(key)
            if not self._pending.get(key):
                self._pending.pop(key, None)

    async def submit_many(self, model: str, rows: Any, **options: Any) -> BatchHandle:
        """As ``Client.submit_many`` (its chunks are sent from a thread); read the handle's
        results with ``await asyncio.to_thread(handle.results)``."""
        return await asyncio.to_thread(self.client.submit_many, model, np.asarray(rows),
                                       **options)

    # -- reading -------------------------------------------------------------------------
    async def get(self, job_id: str) -> JobResult:
        """The job's status and, when done, its outputs; works for any job id."""
        return await asyncio.to_thread(self.client.get, job_id)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job no worker has started; False when it already ran (or is running)."""
        return await asyncio.to_thread(self.client.cancel, job_id)

    async def wait(self, job_id: str, timeout: float | None = 30.0) -> JobResult:
        """Until the job ends (or ``timeout`` s pass: TimeoutError); no thread waits."""
        end = None if timeout is None else time.monotonic() + timeout
        meta = await self._wait(job_id, end)
        if meta is not None and is_final(meta):
            if self.notifier is not None:
                self.notifier.forget(job_id)
            return to_result(job_id, meta)
        status = JobStatus.queued if meta is None else status_of(meta)
        if meta is None:  # never recorded, or expired: JobNotFound from the store
            status = (await self.get(job_id)).status
        raise TimeoutError(f"job {job_id} not finished after {timeout} s "
                           f"(status {status.value})")

    async def _wait(self, job_id: str, end: float | None) -> dict[str, Any] | None:
        if self.notifier is None:
            return await self._poll(job_id, end)
        reply = self.notifier.expected(job_id)
        key = self.client.store.backend.get_key_for_task(job_id)
        if reply is not None:
            return await self._wait_reply(reply, key, end)
        async with self.notifier.watching(key) as watch:
            while True:
                meta = await self._read(key)
                left = _left(end)
                if is_final(meta) or left <= 0:
                    return meta
                await watch.next(min(left, RECHECK_S))

    async def _wait_reply(self, reply: Reply, key: bytes, end: float | None
                          ) -> dict[str, Any] | None:
        """A job sent with the reply channel: its result arrives with the wake-up."""
        meta = None
        while True:
            value = await reply.next(min(_left(end), RECHECK_S))
            if value is not None:
                meta = self.client.store.backend.decode_result(value)
            if not is_final(meta):  # the safety net: read the key itself
                meta = await self._read(key) or meta
            if is_final(meta) or _left(end) <= 0:
                return meta

    async def _read(self, key: bytes) -> dict[str, Any] | None:
        assert self.notifier is not None
        try:
            value = await self.notifier.read(key)
        except (RedisConnectionError, RedisTimeoutError):  # re-read on the next round
            return None
        return None if value is None else self.client.store.backend.decode_result(value)

    async def _poll(self, job_id: str, end: float | None) -> dict[str, Any] | None:
        """A store that cannot publish: reads with pauses growing from 1 ms to 50."""
        for pause in backoff.pauses(0.001, _POLL_MAX_S):
            meta = (await asyncio.to_thread(self.client.store.fetch_many, [job_id]))[0]
            left = _left(end)
            if is_final(meta) or left <= 0:
                return meta
            await asyncio.sleep(min(pause, left))
        raise AssertionError("unreachable: pauses() never ends")


def _left(end: float | None) -> float:
    return float("inf") if end is None else max(0.0, end - time.monotonic())


@dataclass
class AsyncJob:
    client: AsyncClient
    id: str
    model: str

    async def status(self) -> JobStatus:
        return (await self.client.get(self.id)).status

    async def result(self, timeout: float | None = 30.0) -> dict[str, np.ndarray]:
        """The outputs; raises JobFailed if the job or its row failed (JobCancelled if it
        was cancelled), TimeoutError after ``timeout`` s."""
        return (await self.client.wait(self.id, timeout)).checked_outputs()
