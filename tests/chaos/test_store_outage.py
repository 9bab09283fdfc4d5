"""The result store (a test-owned Redis with an append-only file) away for ~5 s while
workers finish batches: workers retry their stores, producers and waiters ride the
outage out, no result is lost."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.chaos.harness import (
    STALL_S,
    Background,
    assert_every_row_once,
    await_results,
    broker_name,
    collect_during,
    job_problems,
    settle,
    settle_jobs,
    tiled,
    worker_env,
)
from tests.conftest import client_for, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

OUTAGE_S = 5.0
SINGLES = 10  # one-row jobs queued behind the bulk job, waited for across the outage


def _restart_and_settle(store: Any, down_s: float, row: Any, client: Any,
                        jobs: dict[str, int], labels: Any, fault_log: Any,
                        timeout: float) -> None:
    """The store (already stopped) stays down ``down_s``, comes back, and every job must
    end with its own result."""
    time.sleep(down_s)  # the outage itself
    store.start()
    back = time.monotonic()
    final = await_results(client, list(jobs), timeout=timeout)
    problems = settle_jobs(row, jobs, final, labels, fault_log, back)
    assert not problems, f"{len(problems)} jobs lost, e.g. {problems[:3]}"


@pytest.mark.timeout(150)
def test_result_store_down_5s_while_workers_finish_batches(broker_env, start_redis,
                                                           start_worker, digits, fault_log,
                                                           chaos_report):
    row = chaos_report(f"result store down {OUTAGE_S:.0f} s",
                       f"{broker_name(broker_env)} (store: test-owned redis)")
    store = start_redis(aof=True)
    env = {**broker_env, "INFERQ_RESULT_BACKEND": store.url()}
    x, labels = tiled(digits, 20_000)
    start_worker(worker_env(env, fault_log, "row_delay_ms=0.16"), "--concurrency", "4")
    client, reader = client_for(env), client_for(env)
    handle = client.submit_many("digits", x, chunk_rows=500)
    singles: dict[str, int] = {}
    waited: list[BaseException] = []
    back: list[float] = []

    def outage() -> None:
        store.stop()
        time.sleep(OUTAGE_S)  # the outage itself
        store.start()
        back.append(time.monotonic())

    def wait_singles() -> None:  # started before the outage, each wait spans it
        for job_id in singles:
            try:
                reader.wait(job_id, timeout=STALL_S)
            except Exception as exc:  # noqa: BLE001 - checked below: a wait must not fail
                waited.append(exc)
                return

    fault = Background(outage)
    waiter = threading.Thread(target=wait_singles, daemon=True)

    def at(n: int) -> None:
        if n == 1:  # every chunk is published: these queue behind them
            singles.update({client.submit("digits", x[i]).id: i for i in range(SINGLES)})
            waiter.start()
        if n == 8:
            fault.start()

    parts = collect_during(fault, handle.iter_results(timeout=STALL_S), at)
    waiter.join(STALL_S)
    row.jobs, row.rows = len(handle.chunks) + SINGLES, len(x) + SINGLES
    answered = settle(row, parts, len(x), fault_log, back[0])
    single_problems = job_problems(singles, await_results(reader, list(singles), 30), labels)
    assert row.lost is not None and row.twice is not None
    row.lost += len(single_problems)
    row.twice -= SINGLES - len(single_problems)  # the singles' rows ran too
    assert handle.pipeline.store_outages >= 1, "the producer never saw the store down"
    assert_every_row_once(parts, answered, labels)
    assert not single_problems, single_problems
    assert not waited, f"waiting for a job across the outage raised {waited[0]!r}"
    assert not waiter.is_alive()


@pytest.mark.timeout(120)
def test_jobs_taken_while_the_result_store_is_down_are_not_lost(redis_env, start_redis,
                                                                start_worker, digits,
                                                                fault_log, chaos_report):
    """A worker given jobs while the store is away hands them back to the broker (a
    store error at claim time used to fail the message, and its jobs stayed queued)."""
    row = chaos_report(f"result store down {OUTAGE_S:.0f} s as a worker takes jobs",
                       "redis (store: test-owned redis)")
    store = start_redis(aof=True)
    env = {**redis_env, "INFERQ_RESULT_BACKEND": store.url()}
    x, labels = tiled(digits, 40)
    client = client_for(env)
    jobs = {client.submit("digits", x[i]).id: i for i in range(len(x))}  # queued: no worker
    row.jobs = row.rows = len(jobs)
    store.stop()
    start_worker(worker_env(env, fault_log), "--concurrency", "4")  # takes them all now
    _restart_and_settle(store, OUTAGE_S, row, client, jobs, labels, fault_log, timeout=10)


# Past Celery's default store retry budget (~10 s, 20.5 s at most); shared/celery_app.py
# now waits out ~60-90 s, as store_many does.
LONG_OUTAGE_S = 30.0


@pytest.mark.slow
@pytest.mark.parametrize("broker_env", ["rabbitmq"], indirect=True)
@pytest.mark.timeout(180)
def test_single_jobs_finishing_in_a_30s_store_outage_keep_their_results(
        broker_env, start_redis, start_worker, digits, fault_log, chaos_report):
    row = chaos_report(f"result store down {LONG_OUTAGE_S:.0f} s as jobs finish",
                       "rabbitmq (store: test-owned redis)")
    store = start_redis(aof=True)
    env = {**broker_env, "INFERQ_RESULT_BACKEND": store.url(), "INFERQ_COALESCE": "false"}
    x, labels = tiled(digits, 4)
    start_worker(worker_env(env, fault_log, "delay_ms=1000"), "--concurrency", "4")
    client = client_for(env)  # one inferq.infer message per job: Celery stores the result
    jobs = {client.submit("digits", x[i]).id: i for i in range(len(x))}
    row.jobs = row.rows = len(jobs)
    wait_until(lambda: None not in client.store.claims.states(list(jobs)), 20,
               "the worker claiming every job (its model call runs)", pause=0.02)
    store.stop()  # the model call (1 s) ends inside the outage
    _restart_and_settle(store, LONG_OUTAGE_S, row, client, jobs, labels, fault_log,
                        timeout=20)
