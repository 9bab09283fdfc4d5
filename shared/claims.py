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
