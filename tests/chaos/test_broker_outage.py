"""The broker (a test-owned Redis with an append-only file) away for ~10 s while
producers submit one-row jobs: a submit either returns a job id that gets its result, or
raises an error naming the job it could not enqueue; never a silent gap.

The worker starts once the broker is back: a worker consuming through the outage can
lose a message on its own side (kombu's Redis transport pops a message before recording
it as unacked; and its channel close after a lost connection can crash the worker), a
transport gap of the worker, not of the producer this test is about.
"""

from __future__ import annotations

import time

import pytest

from shared.errors import Unavailable
from tests.chaos.harness import (
    Submitter,
    await_results,
    settle_jobs,
    tiled,
    worker_env,
)
from tests.conftest import client_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

OUTAGE_S = 10.0
# A producer that gives up after ~1.5 s of retries, to see the error a submit raises.
HASTY_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.3,
               "interval_max": 0.6}


@pytest.mark.timeout(150)
def test_broker_down_10s_while_submitting(redis_env, start_redis, start_worker, digits,
                                          fault_log, chaos_report):
    row = chaos_report(f"broker down {OUTAGE_S:.0f} s while submitting",
                       "redis (test-owned; store: redis)")
    broker = start_redis(aof=True)  # a restart keeps the queued messages
    env = {**redis_env, "INFERQ_BROKER_URL": broker.url()}
    x, labels = tiled(digits, 10_000)
    patient, hasty = client_for(env), client_for(env)
    hasty.coalescer.retry_policy = HASTY_RETRY
    rides_out = Submitter(patient, x[:5_000])  # the default: retries for ~25 s
    gives_up = Submitter(hasty, x[5_000:], threads=2)
    rides_out.start()
    gives_up.start()
    time.sleep(2.0)  # jobs queueing before the fault
    broker.stop()
    time.sleep(OUTAGE_S)  # the outage itself
    broker.start()
    back = time.monotonic()
    start_worker(worker_env(env, fault_log), "--concurrency", "4")
    time.sleep(2.0)  # and flowing again after it
    rides_out.stop()
    gives_up.stop()
    jobs = {**rides_out.jobs, **{j: i + 5_000 for j, i in gives_up.jobs.items()}}
    row.jobs = row.rows = len(jobs)
    final = await_results(patient, list(jobs), timeout=30)
    problems = settle_jobs(row, jobs, final, labels, fault_log, back)
    assert not problems, f"{len(problems)} submitted jobs got no result, e.g. {problems[:3]}"
    assert not rides_out.failed, f"a submit failed within its retries: {rides_out.failed[0]!r}"
    assert gives_up.failed, "no submit gave up: was the broker down?"
    for i, exc in gives_up.failed:
        assert isinstance(exc, Unavailable), f"row {i + 5_000}: {exc!r}"
        message = str(exc)
        assert "was not enqueued" in message and "job " in message, message
        assert f"127.0.0.1:{broker.port}" in message, message  # names the broker
