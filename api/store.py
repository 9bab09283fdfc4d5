"""The API's records in Redis: who owns which job or batch, callbacks due, rate windows.

Job results stay where workers write them (Celery's result keys); the API adds a small
hash per job and per batch holding the tenant, so another tenant's id reads as missing.
The client here fails fast (1 s connect), so an outage answers 503 rather than hanging.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from shared import claims, keys
from shared.claims import Claims
from shared.errors import ConfigError
from shared.results import JobRecord
from shared.settings import Settings

# Lua: take a callback that is due by pushing its score out by a lease, so that among
# several API replicas exactly one delivers it; a crash mid-delivery retries after the lease.
_LEASE = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

# Lua: a tenant's open work on one model (``key``, a sorted set of job and chunk ids by
# submit time). ``forget_claimed``: forget ids a worker has claimed (started or
# cancelled: their claim key, ``claimed`` .. id, exists) among the oldest ``prune``, and
# ids older than ``cutoff``; -> the open count. ``admit``: then admit ``ids`` at score
# ``now`` when the tenant is within its ``share`` or the model's queue has room
# (``depth`` + new <= ``limit``). -> {admitted 0/1, the tenant's open count before these}.
# Shared by ADMIT and the API's submit script (api/submitter.py).
ADMIT_FUNCTION = """
local function forget_claimed(key, cutoff, claimed, prune)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
  for _, id in ipairs(redis.call('ZRANGE', key, 0, tonumber(prune) - 1)) do
    if redis.call('EXISTS', claimed .. id) == 1 then redis.call('ZREM', key, id) end
  end
  return redis.call('ZCARD', key)
end
local function admit(key, now, cutoff, claimed, share, depth, limit, prune, ids)
  local open = forget_claimed(key, cutoff, claimed, prune)
  if open + #ids > tonumber(share) and tonumber(depth) + #ids > tonumber(limit) then
    return {0, open}
  end
  for _, id in ipairs(ids) do redis.call('ZADD', key, now, id) end
  redis.call('EXPIRE', key, math.ceil(tonumber(now) - tonumber(cutoff)) + 60)
  return {1, open}
end
"""
# KEYS[1]: the open set; ARGV: now, cutoff, claim prefix, share, depth, limit, prune, ids...
_ADMIT = ADMIT_FUNCTION + """
local ids = {}
for i = 8, #ARGV do ids[#ids + 1] = ARGV[i] end
return admit(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ids)
"""
PRUNE = 128  # claimed ids looked for per admission, oldest first


@dataclass(frozen=True)
class Admission:
    """What admitting work to ``model``'s queue checks (``ApiStore.admit``): ``tenant``
    may hold ``share`` open ids, or any number while the queue (``depth`` messages) stays
    within ``limit``."""

    model: str
    tenant: str
    share: int
    depth: int
    limit: int

class ApiStore:
    def __init__(self, settings: Settings, app: Celery):
        url = settings.effective_result_backend()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("INFERQ_RESULT_BACKEND: the API needs a redis:// result store "
                              "(it keeps job ownership and batch progress there)")
        # Any: redis-py's stubs type every reply as a union of bytes and str.
        self.url = url
        self._aredis: Any = None  # redis.asyncio, made on first use in the API's loop
        self.redis: Any = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=5.0,
                                          health_check_interval=30)
        self.backend = app.backend
        self.expires = settings.result_expires
        self.claims = Claims(self.backend, self.expires)
        self.claims.redis = self.redis  # same keys, the fail-fast connection
        self.prefix = keys.api_prefix(settings.queue_prefix)
        self.callbacks_key = self.prefix + "callbacks"
        self._lease = self.redis.register_script(_LEASE)
        self._admit = self.redis.register_script(_ADMIT)

    # -- keys ----------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job-{job_id}"

    def batch_key(self, batch_id: str) -> str:
        return f"{self.prefix}batch-{batch_id}"

    def meta_key(self, job_id: str) -> bytes:
        return bytes(self.backend.get_key_for_task(job_id))

    # -- jobs ----------------------------------------------------------------------------
    def create_job(self, job_id: str, record: dict[str, Any], *, callback: bool,
                   admission: Admission | None = None) -> tuple[dict[str, str], int | None]:
        """The owner's record and a queued result, in one round trip, before publishing;
        with ``admission``, the job is admitted (``admit``) in that same round trip.
        -> (the record as stored, what ``job_record`` reads back; None, or the tenant's
        open ids when the job was refused: then nothing of it is kept)."""
        queued = JobRecord.queued(job_id, record["model"], record["submitted_at"])
        flat = flat_record(record)
        pipe = self.redis.pipeline(transaction=False)
        if admission is not None:  # first: a refusal is undone below, before anyone knows
            names, args = self._admit_call(admission, [job_id])
            pipe.evalsha(self._admit.sha, len(names), *names, *args)
        pipe.hset(self.job_key(job_id), mapping=flat)
        pipe.expire(self.job_key(job_id), self.expires)
        pipe.set(self.meta_key(job_id), queued.encode(self.backend), ex=self.expires)
        if callback:
            pipe.zadd(self.callbacks_key, {f"job:{job_id}": time.time()})
        replies = pipe.execute(raise_on_error=False)
        if admission is None:
            _raise_first(replies)
            return flat, None
        try:
            _raise_first(replies[1:])
            verdict = replies[0]
            if isinstance(verdict, redis.exceptions.NoScriptError):  # a restarted server
                verdict = self._admit(keys=names, args=args)
            _raise_first([verdict])
        except BaseException:
            self.drop_job(job_id)
            raise
        if not verdict[0]:
            self.drop_job(job_id)
            return flat, int(verdict[1])
        return flat, None

    def drop_job(self, job_id: str) -> None:
        """Undo ``create_job`` when publishing failed: no record of a job never sent."""
        self.redis.delete(self.job_key(job_id), self.meta_key(job_id))
        self.redis.zrem(self.callbacks_key, f"job:{job_id}")

    def job_record(self, job_id: str) -> dict[str, str]:
        return _decode(self.redis.hgetall(self.job_key(job_id)))

    def update_job(self, job_id: str, **fields: Any) -> None:
        self.redis.hset(self.job_key(job_id), mapping=flat_record(fields))

    def first_final(self, job_id: str) -> bool:
        """True the first time anyone records this job as finished (for metrics). A job
        created ``observed`` is counted by its submitter, who clears the mark if it stops
        waiting before the end."""
        return bool(self.redis.hsetnx(self.job_key(job_id), "observed", "1"))

    def unobserve(self, job_id: str) -> None:
        self.redis.hdel(self.job_key(job_id), "observed")

    def metas(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        if not job_ids:
            return []
        values = self.redis.mget([self.meta_key(j) for j in job_ids])
        return [None if v is None else self.backend.decode_result(v) for v in values]

    def meta_with_claim(self, job_id: str) -> tuple[dict[str, Any] | None, bytes | None]:
        meta, claim = self.redis.mget([self.meta_key(job_id), keys.claim(job_id)])
        return (None if meta is None else self.backend.decode_result(meta)), claim

    def store_final(self, job_id: str, value: dict[str, Any], state: str) -> None:
        self._store_finals([(job_id, value)], state)

    def _store_finals(self, items: list[tuple[str, dict[str, Any]]], state: str) -> None:
        """Stored and published, like a worker's result, so long polls wake at once."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, value in items:
            key, encoded = self.meta_key(job_id), JobRecord(job_id, state, value).encode(
                self.backend)
            pipe.set(key, encoded, ex=self.expires)
            pipe.publish(key, encoded)
        pipe.execute()

    def cancel(self, job_ids: list[str]) -> list[bool]:
        """Claim jobs as cancelled (shared/claims.py) and store those won as cancelled,
        keeping what their queued record said; three round trips however many."""
        won = [j for j, ok in zip(job_ids, self.claims.cancel(job_ids), strict=True) if ok]
        now = time.time()
        items = []
        for job_id, meta in zip(won, self.metas(won), strict=True):
            info = (meta or {}).get("result")
            items.append((job_id, {**(info if isinstance(info, dict) else {}),
                                   "cancelled_at": now}))
        if items:
            self._store_finals(items, claims.CANCELLED_STATE)
        taken = set(won)
        return [j in taken for j in job_ids]

    # -- batches -------------------------------------------------------------------------
    def create_batch(self, batch_id: str, record: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.batch_key(batch_id), mapping=flat_record(record))
        pipe.expire(self.batch_key(batch_id), self.expires)
        pipe.execute()

    def batch_record(self, batch_id: str) -> dict[str, str]:
        return _decode(self.redis.hgetall(self.batch_key(batch_id)))

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        self.redis.hset(self.batch_key(batch_id), mapping=flat_record(fields))

    def add_bad_rows(self, batch_id: str, errors: dict[int, str]) -> None:
        """Rows refused before sending (wrong shape, not a number): row -> message."""
        if errors:
            key = self.batch_key(batch_id) + "-bad"
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping={str(k): v for k, v in errors.items()})
            pipe.expire(key, self.expires)
            pipe.execute()

    def bad_rows(self, batch_id: str, first: int, last: int) -> dict[int, str]:
        """Refused rows in [first, last); read once per chunk."""
        key = self.batch_key(batch_id) + "-bad"
        values = self.redis.hmget(key, [str(r) for r in range(first, last)])
        return {first + i: v.decode() for i, v in enumerate(values) if v is not None}

    def chunk_progress(self, batch_id: str) -> dict[int, tuple[int, int, int]]:
        """Chunks already counted: chunk number -> (rows, failed rows, cancelled rows)."""
        raw = self.redis.hgetall(self.batch_key(batch_id) + "-done")
        return {int(k): tuple(json.loads(v)) for k, v in raw.items()}  # type: ignore[misc]

    def add_chunk_progress(self, batch_id: str, done: dict[int, tuple[int, int, int]]
                           ) -> None:
        if done:
            key = self.batch_key(batch_id) + "-done"
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping={str(k): json.dumps(v) for k, v in done.items()})
            pipe.expire(key, self.expires)
            pipe.execute()

    # -- callbacks -----------------------------------------------------------------------
    def add_callback(self, member: str, when: float) -> None:
        self.redis.zadd(self.callbacks_key, {member: when})

    def due_callbacks(self, now: float, lease: float, limit: int = 64) -> list[str]:
        due = self.redis.zrangebyscore(self.callbacks_key, 0, now, start=0, num=limit)
        taken = []
        for member in due:
            if self._lease(keys=[self.callbacks_key], args=[member, now, now + lease]):
                taken.append(member.decode())
        return taken

    def reschedule_callback(self, member: str, when: float) -> None:
        self.redis.zadd(self.callbacks_key, {member: when})

    def drop_callback(self, member: str) -> None:
        self.redis.zrem(self.callbacks_key, member)

    # -- fair admission (api/limits.py decides the numbers) ----------------------
    def open_key(self, model: str, tenant: str) -> str:
        return f"{self.prefix}open-{model}-{tenant}"

    def admit(self, admission: Admission, ids: list[str]) -> tuple[bool, int]:
        """Record ``ids`` as the tenant's open work on the model if it is admitted: the
        tenant holds at most its share of ids with them, or the model's queue stays within
        its limit. -> (admitted, the tenant's open ids before)."""
        names, args = self._admit_call(admission, ids)
        ok, open_ = self._admit(keys=names, args=args)
        return bool(ok), int(open_)

    def _admit_call(self, a: Admission, ids: list[str]) -> tuple[list[str], list[Any]]:
        now = time.time()
        return [self.open_key(a.model, a.tenant)], [
            now, now - self.expires, keys.claim(""), a.share, a.depth, a.limit, PRUNE, *ids]

    def forget_open(self, model: str, tenant: str, ids: list[str]) -> None:
        """Ids admitted but never queued (publishing failed, nothing valid to run)."""
        if ids:
            self.redis.zrem(self.open_key(model, tenant), *ids)

    # -- rate limits ---------------------------------------------------------------------
    def hit(self, tenant: str, now: float) -> int:
        """Requests of ``tenant`` in the current one-second window, this one included."""
        key = self._rate_key(tenant, now)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 2)
        return int(pipe.execute()[0])

    def _rate_key(self, tenant: str, now: float) -> str:
        return f"{self.prefix}rate-{tenant}-{int(now)}"

    async def hit_async(self, tenant: str, now: float) -> int:
        """``hit`` from the event loop (the API's gate), on its own asyncio client."""
        key = self._rate_key(tenant, now)
        async with self.aredis().pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2)
            return int((await pipe.execute())[0])

    def aredis(self) -> Any:
        """The asyncio client of the API's event loop (made on first use there)."""
        if self._aredis is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries of its own: a retried script would run twice (api/submitter.py
            # retries as the publish policy says, where a repeat is known to be harmless).
            self._aredis = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=1.0, socket_timeout=5.0,
                health_check_interval=30, retry=Retry(NoBackoff(), 0))
        return self._aredis

    async def close_async(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = None

    def ping(self) -> bool:
        return bool(self.redis.ping())


def flat_record(record: dict[str, Any]) -> dict[str, str]:
    """A record as its Redis hash holds it: text, JSON for the rest; no empty fields."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()
            if v is not None}


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _raise_first(replies: list[Any]) -> None:
    """A pipeline run with ``raise_on_error=False``: raise its first error, if any."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
