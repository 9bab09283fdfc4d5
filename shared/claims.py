"""Who runs a job, or whether it was cancelled first: one Redis key per job id.

A worker *claims* a job before running it (``SET claim run NX GET``); a cancel claims it
as ``cancelled`` the same way. Whichever writes first wins, in one round trip each, so a
cancel that was answered "cancelled" can never be followed by a run, and a job that
started can never be reported cancelled. A redelivered job finds its own ``run`` claim
and runs again (at-least-once). The claim also tells "running" from "queued".

Only Redis result stores have claims; with the embedded file store every job runs and
cancelling is refused.
"""

from __future__ import annotations

from typing import Any

from shared import keys

RUN = b"run"
CANCELLED = b"cancelled"
CANCELLED_STATE = "CANCELLED"  # the stored state of a cancelled job (not one of Celery's)
EXPIRED_STATE = "EXPIRED"  # a job whose deadline passed before it ran (not run)


def redis_of(backend: Any) -> Any | None:
    """The redis client of a Celery Redis result backend, else None."""
    client = getattr(backend, "client", None)
    return client if client is not None and hasattr(client, "set") else None


class Claims:
    def __init__(self, backend: Any, expires: int):
        self.redis = redis_of(backend)
        self.expires = expires

    @property
    def supported(self) -> bool:
        return self.redis is not None

    def take(self, job_id: str) -> bool:
        """Claim a job for running; False when it was cancelled first."""
        if self.redis is None:
            return True
        old = self.redis.set(keys.claim(job_id), RUN, nx=True, get=True, ex=self.expires)
        return old != CANCELLED

    def send(self, job_ids: list[str]) -> Sent:
        """``take_many`` without waiting: the claims go now, their answers are read later
        (``Sent.taken``)."""
        return Sent(self, job_ids)

    def take_many(self, job_ids: list[str]) -> list[bool]:
        """``take`` for several jobs in one round trip."""
        if self.redis is None:
            return [True] * len(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(keys.claim(job_id), RUN, nx=True, get=True, ex=self.expires)
        return [old != CANCELLED for old in pipe.execute()]

    def cancel(self, job_ids: list[str]) -> list[bool]:
        """Claim jobs as cancelled; True for each one no worker had claimed before."""
        if self.redis is None:
            raise NotImplementedError("cancelling needs a Redis result store")
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(keys.claim(job_id), CANCELLED, nx=True, get=True, ex=self.expires)
        return [old is None or old == CANCELLED for old in pipe.execute()]

    def states(self, job_ids: list[str]) -> list[bytes | None]:
        """Each job's claim: RUN, CANCELLED or None (not claimed yet)."""
        if self.redis is None or not job_ids:
            return [None] * len(job_ids)
        return list(self.redis.mget([keys.claim(j) for j in job_ids]))


class Sent:
    """Claims sent and not yet read (``Claims.send``): the worker checks and runs a
    message's rows while they travel, and reads them (``taken``) before it stores a
    result. A run whose job turns out cancelled is dropped unseen, so "a cancel answered
    `cancelled` is never followed by a run" holds for everything a client can observe;
    the model call costs a few rows at most (docs/design.md, "What a request costs")."""

    def __init__(self, claims: Claims, job_ids: list[str]):
        self.claims, self.job_ids = claims, job_ids
        self._taken: list[bool] | None = None if claims.redis is not None \
            else [True] * len(job_ids)
        self._connection: Any = None
        if claims.redis is None:
            return
        pool = claims.redis.connection_pool
        try:
            connection = pool.get_connection()
        except Exception:  # noqa: BLE001 - ``taken`` claims the ordinary way, with retries
            return
        try:
            connection.send_packed_command(connection.pack_commands(
                [("SET", keys.claim(j), RUN, "NX", "GET", "EX", claims.expires)
                 for j in job_ids]))
        except Exception:  # noqa: BLE001 - likewise
            connection.disconnect()
            pool.release(connection)
            return
        self._connection = connection

    def taken(self) -> list[bool]:
        """Each job's claim (False: cancelled first); read once, then remembered."""
        if self._taken is None:
            self._taken = self._read()
        if self._taken is None:  # the sent claims were lost: again (SET NX GET: the same
            self._taken = self.claims.take_many(self.job_ids)  # answer for our own claim)
        return self._taken

    def discard(self) -> None:
        """Give the connection back unread (the caller will not ask ``taken``)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()
            self.claims.redis.connection_pool.release(connection)  # type: ignore[union-attr]

    def _read(self) -> list[bool] | None:
        connection, self._connection = self._connection, None
        if connection is None:
            return None
        pool = self.claims.redis.connection_pool  # type: ignore[union-attr]
        try:
            replies = [connection.read_response() for _ in self.job_ids]
        except Exception:  # noqa: BLE001 - the connection's state is unknown: claim again
            connection.disconnect()
            return None
        finally:
            pool.release(connection)
        return [old != CANCELLED for old in replies]
