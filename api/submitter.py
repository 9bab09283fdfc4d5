"""Single-job submits of one API process, committed together once per turn of its event
loop: one Redis round trip, no thread.

Where the broker is Redis and also the result store (the default), each job's record, its
queued result, its admission and the message that carries it are one script (SUBMIT):
a job is either admitted, recorded and queued, or none of these. Requests that arrive
while a commit is in flight wait for the next one, which carries them all, one message
per model, priority and tenant (``producer/coalesce.py``'s group commit, without its
threads: the previous path cost two thread hand-offs and two round trips per request).
Elsewhere (RabbitMQ, SQS, a separate result store) the API keeps that path
(``api/jobs.py``). Design notes: docs/design.md, "What a request costs".
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.store import ADMIT_FUNCTION, PRUNE, ApiStore, flat_record
from producer.bulk.chunks import payload_bytes
from producer.coalesce import many_message, take
from producer.direct import DirectPublisher
from producer.publish import Sender, not_sent
from shared import backoff, keys
from shared.celery_app import INFER_MANY_TASK
from shared.queues import PRIORITIES, queue_name
from shared.redis_transport import WAKE_TTL_MS
from shared.repository import ModelRef
from shared.results import JobRecord

# KEYS: 1 the message's list, 2 its queue's wake marker, 3 callbacks due, 4 the tenant's
# open ids on the model, 5.. the model's queue lists (its depth, counted here).
# ARGV: 1 message, 2 marker TTL ms, 3 record TTL s, 4 now, 5 admit 1/0, 6 cutoff,
# 7 claim prefix, 8 share, 9 limit, 10 prune, 11 job count; then per job: id, record key,
# result key, queued result, callback 1/0, field count, fields and values.
# Each job is admitted on its own, in order, as if those before it were; only when every
# one is are they recorded and the message pushed; else nothing is written. A repeat of a
# commit that ran (its reply was lost) finds the first record and writes nothing again.
# -> {all admitted 1/0, the model's depth, then per job: admitted 1/0, the tenant's open
# ids before it}
SUBMIT = ADMIT_FUNCTION + """
local jobs, i = {}, 12
for j = 1, tonumber(ARGV[11]) do
  jobs[j] = {i, tonumber(ARGV[i + 5])}
  i = i + 6 + 2 * jobs[j][2]
end
local depth = 0
for k = 5, #KEYS do depth = depth + redis.call('LLEN', KEYS[k]) end
local out = {1, depth}
if redis.call('EXISTS', ARGV[13]) == 1 then  -- a repeat of a commit that ran
  for _ = 1, #jobs do out[#out + 1] = 1; out[#out + 1] = 0 end
  return out
end
local open, share, limit, taken = 0, math.huge, 0, 0
if ARGV[5] == '1' then
  open = forget_claimed(KEYS[4], ARGV[6], ARGV[7], ARGV[10])
  share, limit = tonumber(ARGV[8]), tonumber(ARGV[9])
end
for _ = 1, #jobs do
  local ok = open + taken + 1 <= share or depth + taken + 1 <= limit
  out[#out + 1] = ok and 1 or 0
  out[#out + 1] = open + taken
  if ok then taken = taken + 1 else out[1] = 0 end
end
if out[1] == 0 then return out end
if ARGV[5] == '1' then
  for _, job in ipairs(jobs) do redis.call('ZADD', KEYS[4], ARGV[4], ARGV[job[1]]) end
  redis.call('EXPIRE', KEYS[4], math.ceil(tonumber(ARGV[4]) - tonumber(ARGV[6])) + 60)
end
for _, job in ipairs(jobs) do
  local at, fields = job[1], {}
  for f = at + 6, at + 5 + 2 * job[2] do fields[#fields + 1] = ARGV[f] end
  redis.call('HSET', ARGV[at + 1], unpack(fields))
  redis.call('EXPIRE', ARGV[at + 1], ARGV[3])
  redis.call('SET', ARGV[at + 2], ARGV[at + 3], 'EX', ARGV[3])
  if ARGV[at + 4] == '1' then redis.call('ZADD', KEYS[3], ARGV[4], 'job:' .. ARGV[at]) end
end
if redis.call('LPUSH', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return out
"""
_SHA = hashlib.sha1(SUBMIT.encode()).hexdigest()
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# A commit whose inputs weigh more is encoded in a thread, as is one before the publisher
# has its channel (a first connection): the loop must not stall on either.
ENCODE_ON_LOOP_BYTES = 1 << 20

Verdict = tuple[bool, int, int]  # admitted, the tenant's open ids before it, the depth


@dataclass(frozen=True)
class Quota:
    """The tenant's admission on the model (``Api.quota``); the depth is read by the
    script itself."""

    tenant: str
    share: int
    limit: int


@dataclass
class Pending:
    job_id: str
    ref: ModelRef
    priority: str
    inputs: dict[str, Any]  # as they travel (``wire_inputs``)
    record: dict[str, Any]  # the API's record of the job (``ApiStore.create_job``)
    callback: bool
    quota: Quota | None
    deadline: float | None = None
    trace: dict[str, str] | None = None  # its submit span's context (shared/tracing.py)
    submitted_at: float = field(default_factory=time.time)
    done: asyncio.Future[Verdict] | None = None

    def group(self) -> tuple[Any, ...]:
        """Jobs that may share a message: same model, priority and admission."""
        return self.ref.name, self.ref.variant, self.ref.version, self.priority, self.quota


class LoopSubmitter:
    def __init__(self, store: ApiStore, sender: Sender, publisher: DirectPublisher,
                 reply_to: str, retry_policy: dict[str, Any]):
        self.store = store
        self.sender = sender
        self.publisher = publisher
        self.reply_to = reply_to
        self.retry_policy = retry_policy
        self.max_bytes = sender.settings.max_message_bytes // 2  # as the coalescer's
        self._pending: dict[tuple[Any, ...], list[Pending]] = {}
        self._task: asyncio.Task[None] | None = None
        self._depth_keys: dict[str, list[str]] = {}
        self.messages = 0
        self.jobs = 0

    @staticmethod
    def usable(sender: Sender) -> bool:
        """The broker is Redis, published to directly, and it is the result store too."""
        settings = sender.settings
        return (sender.direct is not None
                and settings.effective_result_backend() == settings.broker_url)

    async def submit(self, job: Pending, then: Callable[[Verdict], None] | None = None
                     ) -> Verdict:
        """Return once ``job`` is recorded and on the broker, or refused. -> (admitted,
        the tenant's open ids before it, the model's queue depth); raises Unavailable
        when Redis could not be reached. ``then``: called with the verdict when it is
        known, even if the caller stopped waiting (its request went away)."""
        job.done = asyncio.get_running_loop().create_future()
        if then is not None:
            job.done.add_done_callback(
                lambda done: None if done.exception() else then(done.result()))
        self._pending.setdefault(job.group(), []).append(job)
        if self._task is None or self._task.done():  # else the running one takes it
            # a context of its own: the task outlives the request that started it
            self._task = asyncio.create_task(self._commits(), context=contextvars.Context())
        return await asyncio.shield(job.done)  # a request gone away does not undo it

    async def _commits(self) -> None:
        """Commit what is pending until nothing is; whatever fails, every job taken
        hears it (on cancellation, those still pending too)."""
        while self._pending:
            groups, self._pending = self._pending, {}
            jobs = [job for group in groups.values() for job in group]
            try:
                batches = []
                for group in groups.values():
                    while group:
                        batches.append(take(group, self.max_bytes))
                again = await self._commit(batches)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    jobs += [job for group in self._pending.values() for job in group]
                for job in jobs:
                    _settle(job, error=self._error(job, exc))
                if not isinstance(exc, Exception):
                    raise
                continue
            for key, group in again.items():  # ahead of those that came after them
                self._pending[key] = group + self._pending.get(key, [])

    async def _commit(self, batches: list[list[Pending]]) -> dict[tuple[Any, ...],
                                                                  list[Pending]]:
        """-> the jobs to send again: admissible, but in a message with a refused job."""
        heavy = not self.publisher.ready or sum(
            payload_bytes(job.inputs) for batch in batches for job in batch
        ) > ENCODE_ON_LOOP_BYTES
        calls = (await asyncio.to_thread(self._calls, batches)) if heavy \
            else self._calls(batches)
        replies = await self._run(calls)
        again: dict[tuple[Any, ...], list[Pending]] = {}
        for batch, reply in zip(batches, replies, strict=True):
            if isinstance(reply, Exception):
                for job in batch:
                    _settle(job, error=self._error(job, reply))
                continue
            every, depth = bool(reply[0]), int(reply[1])
            if every:
                self.messages += 1
                self.jobs += len(batch)
            for k, job in enumerate(batch):
                admitted, held = bool(reply[2 + 2 * k]), int(reply[3 + 2 * k])
                if every or not admitted:
                    _settle(job, result=(admitted, held, depth))
                else:
                    again.setdefault(job.group(), []).append(job)
        return again

    async def _run(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline of SUBMIT calls; connection errors retried as ``retry_policy``
        says (a repeat of a call that ran finds its records and writes nothing)."""
        redis = self.store.aredis()
        retries = int(self.retry_policy.get("max_retries") or 0)
        for attempt in range(retries + 1):
            try:
                replies = await _pipeline(redis, calls)
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:  # a restarted server: load the script, send those again
                    await redis.script_load(SUBMIT)
                    for i, reply in zip(missing, await _pipeline(
                            redis, [calls[i] for i in missing]), strict=True):
                        replies[i] = reply
                return replies
            except _DOWN:
                if attempt == retries:
                    raise
                await asyncio.sleep(backoff.exponential(
                    attempt, float(self.retry_policy.get("interval_start", 0.1)) or 0.1,
                    float(self.retry_policy.get("interval_max", 1.0))))
        raise AssertionError("unreachable")

    def _calls(self, batches: list[list[Pending]]) -> list[tuple[Any, ...]]:
        return [self._call(batch) for batch in batches]

    def _call(self, batch: list[Pending]) -> tuple[Any, ...]:
        """EVALSHA SUBMIT's arguments for one message of ``batch``."""
        first, store = batch[0], self.store
        queue = queue_name(self.sender.settings, first.ref.name, first.priority)
        task_id, kwargs, headers, options = many_message(first.ref, batch, self.reply_to)
        message = self.publisher.encode(INFER_MANY_TASK, task_id, kwargs, queue, headers,
                                        **options)
        quota, now = first.quota, time.time()
        names = [message.key, message.wake, store.callbacks_key,
                 store.open_key(first.ref.name, quota.tenant if quota else ""),
                 *self._queue_keys(first.ref.name)]
        args: list[Any] = [message.payload, WAKE_TTL_MS, store.expires, now,
                           1 if quota else 0, now - store.expires, keys.claim(""),
                           quota.share if quota else 0, quota.limit if quota else 0, PRUNE,
                           len(batch)]
        for job in batch:
            flat = flat_record(job.record)
            queued = JobRecord.queued(job.job_id, job.ref.name, job.submitted_at)
            args += [job.job_id, store.job_key(job.job_id), store.meta_key(job.job_id),
                     queued.encode(store.backend), 1 if job.callback else 0, len(flat)]
            for name, value in flat.items():
                args += [name, value]
        return ("EVALSHA", _SHA, len(names), *names, *args)

    def _queue_keys(self, model: str) -> list[str]:
        """The lists of the model's queues, every priority step (its depth)."""
        if model not in self._depth_keys:
            self._depth_keys[model] = [
                k for p in PRIORITIES
                for k in self.publisher.queue_keys(queue_name(self.sender.settings, model, p))]
        return self._depth_keys[model]

    def _error(self, job: Pending, exc: BaseException) -> BaseException:
        if isinstance(exc, OSError):  # what redis-py did not wrap: still "unreachable"
            exc = RedisConnectionError(f"{type(exc).__name__}: {exc}")
        return not_sent(f"job {job.job_id} (model {job.ref.name})", self.sender, exc)


async def _pipeline(redis: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.execute_command(*call)
        return list(await pipe.execute(raise_on_error=False))


def _settle(job: Pending, *, result: Verdict | None = None,
            error: BaseException | None = None) -> None:
    if job.done is None or job.done.done():
        return
    if error is not None:
        job.done.set_exception(error)
    else:
        job.done.set_result(result)  # type: ignore[arg-type]
