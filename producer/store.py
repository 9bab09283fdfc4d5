"""Reading job records (shared/results.py) from the result store, many keys per round
trip, and waiting for them to be final."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, states

from producer.waiter import ResultWaiter
from shared import backoff, claims
from shared.claims import Claims
from shared.errors import InferqError, JobNotFound
from shared.results import JobRecord, is_final, status_of


class ResultStore:
    """The result backend as a key-value store: job id -> the task's meta dict."""

    def __init__(self, app: Celery):
        self.backend = app.backend
        self.claims = Claims(app.backend, int(app.conf.result_expires or 0) or 7 * 86400)
        self._waiter: ResultWaiter | None = None

    def mark_queued(self, job_id: str, info: dict[str, Any]) -> None:
        """Record a job before publishing it, so ``get`` tells queued from unknown."""
        record = JobRecord(job_id, states.PENDING, info)
        self.backend.store_result(job_id, record.result, record.state)

    def fetch_many(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        if not job_ids:
            return []
        keys = [self.backend.get_key_for_task(j) for j in job_ids]
        values = list(self.backend.mget(keys))
        return [None if v is None else self.backend.decode_result(v) for v in values]

    def fetch(self, job_id: str) -> dict[str, Any]:
        meta = self.fetch_many([job_id])[0]
        if meta is None:
            raise JobNotFound(f"no job {job_id!r} in the result store "
                              "(never submitted, or its result expired)")
        if not is_final(meta) and self.claims.states([job_id])[0] == claims.RUN:
            meta = {**meta, "status": states.STARTED}
        return meta

    def cancel(self, job_ids: list[str]) -> list[bool]:
        """Cancel jobs no worker has started; True for each one cancelled now or before.

        A cancelled job is stored as final (``cancelled``), so waiting readers return.
        """
        if not self.claims.supported:
            raise InferqError("cancelling needs a Redis result store (INFERQ_RESULT_BACKEND)")
        won = self.claims.cancel(job_ids)
        now = time.time()
        for job_id, ok, meta in zip(job_ids, won, self.fetch_many(job_ids), strict=True):
            if ok and not is_final(meta):
                info = (meta or {}).get("result")
                info = {**info} if isinstance(info, dict) else {}
                self.backend.store_result(job_id, {**info, "cancelled_at": now},
                                          claims.CANCELLED_STATE)
        return won

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job is final; its meta. On Redis, woken by the result's publish.

        A job with no record yet counts as queued until the timeout; then it is unknown.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.claims.redis is not None:
            meta = self._wait_published(job_id, deadline)
        else:
            meta = self._wait_polling(job_id, deadline)
        if meta is not None and is_final(meta):
            return meta
        if meta is None:
            meta = self.fetch(job_id)  # raises JobNotFound
            if is_final(meta):
                return meta
        raise TimeoutError(f"job {job_id} not finished after {timeout} s "
                           f"(status {status_of(meta).value})")

    def waiter(self) -> ResultWaiter | None:
        """This process's result listener (Redis stores only); created on first use."""
        if self._waiter is None and self.claims.redis is not None:
            self._waiter = ResultWaiter(self.claims.redis)
        return self._waiter

    def wait_reply(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """``wait`` for a job sent with this process's reply channel (no subscription)."""
        waiter = self.waiter()
        if waiter is None or waiter.reply_channel is None:
            return self.wait(job_id, timeout)
        while True:  # timeout None: wait for as long as it takes, an hour at a time
            meta: dict[str, Any] | None = waiter.wait_reply(
                job_id, lambda: self.fetch_many([job_id])[0], is_final,
                self.backend.decode_result, 3600.0 if timeout is None else timeout)
            if meta is not None and is_final(meta):
                return meta
            if timeout is not None:
                break
        meta = self.fetch(job_id)  # raises JobNotFound for an unknown id
        if is_final(meta):
            return meta
        raise TimeoutError(f"job {job_id} not finished after {timeout} s "
                           f"(status {status_of(meta).value})")

    def _wait_published(self, job_id: str, deadline: float | None) -> dict[str, Any] | None:
        """Woken by the result's publish (Celery's Redis backend publishes each stored
        result on a channel named after its key); one listener per process."""
        waiter = self.waiter()
        assert waiter is not None
        while True:  # deadline None: wait for as long as it takes, an hour at a time
            left = 3600.0 if deadline is None else max(0.0, deadline - time.monotonic())
            meta: dict[str, Any] | None = waiter.wait(
                self.backend.get_key_for_task(job_id), lambda: self.fetch_many([job_id])[0],
                is_final, self.backend.decode_result, left)
            if deadline is not None or is_final(meta):
                return meta

    def _wait_polling(self, job_id: str, deadline: float | None) -> dict[str, Any] | None:
        """For stores without publish (the embedded file store): 1 ms pauses growing to 50."""
        for pause in backoff.pauses(0.001, 0.05):
            meta = self.fetch_many([job_id])[0]
            if is_final(meta) or (deadline is not None and time.monotonic() >= deadline):
                return meta
            time.sleep(pause)
        raise AssertionError("unreachable: pauses() never ends")
