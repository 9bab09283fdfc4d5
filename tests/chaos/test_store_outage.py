"""The result store (a test-owned Redis with an append-only file) down for ~5 s while
workers finish batches: workers retry their stores, the producer waits for the store,
no result is lost."""

from __future__ import annotations

import threading
import time

import pytest

from shared.errors import Unavailable
from tests.chaos.harness import (
    STALL_S,
    Background,
    Submitter,
    assert_every_row_once,
    await_results,
    broker_name,
    collect,
    settle,
    settle_jobs,
    tiled,
    worker_env,
)
from tests.conftest import client_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

OUTAGE_S = 5.0


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
    handle = client_for(env).submit_many("digits", x, chunk_rows=500)
    row.jobs, row.rows = len(handle.chunks), len(x)
    back: list[float] = []

    def outage() -> None:
        store.stop()
        time.sleep(OUTAGE_S)  # the outage itself
        store.start()
        back.append(time.monotonic())

    fault = Background(outage)
    parts = collect(handle.iter_results(timeout=STALL_S), lambda n: n == 8 and fault.start())
    fault.join()
    answered = settle(row, parts, len(x), fault_log, back[0])
    assert handle.pipeline.store_outages >= 1, "the producer never saw the store down"
    assert_every_row_once(parts, answered, labels)


@pytest.mark.timeout(150)
def test_result_store_down_5s_while_single_jobs_run(broker_env, start_redis, start_worker,
                                                    digits, fault_log, chaos_report):
    """One-row jobs submitted all along (each either raises or gets its result), one
    waiter reading them back across the outage."""
    row = chaos_report(f"result store down {OUTAGE_S:.0f} s (single jobs)",
                       f"{broker_name(broker_env)} (store: test-owned redis)")
    store = start_redis(aof=True)
    env = {**broker_env, "INFERQ_RESULT_BACKEND": store.url()}
    x, labels = tiled(digits, 10_000)
    start_worker(worker_env(env, fault_log, "delay_ms=20"), "--concurrency", "4")
    client = client_for(env)
    submitter = Submitter(client, x)
    waited: list[BaseException] = []

    def wait_all() -> None:  # a reader waiting on each job in turn, across the outage
        done: set[str] = set()
        while not stop_waiting.is_set() or len(done) < len(submitter.jobs):
            todo = [j for j in list(submitter.jobs) if j not in done]
            if not todo:
                stop_waiting.wait(0.05)
                continue
            try:
                client.wait(todo[0], timeout=30)
            except Exception as exc:  # noqa: BLE001 - a waiter must ride the outage out
                waited.append(exc)
                return
            done.add(todo[0])

    stop_waiting = threading.Event()
    waiter = threading.Thread(target=wait_all, daemon=True)
    submitter.start()
    waiter.start()
    time.sleep(2.0)  # jobs flowing before the fault
    store.stop()
    time.sleep(OUTAGE_S)  # the outage itself
    store.start()
    back = time.monotonic()
    time.sleep(2.0)  # and flowing again after it
    submitter.stop()
    stop_waiting.set()
    row.jobs = row.rows = len(submitter.jobs)
    final = await_results(client, list(submitter.jobs), timeout=60)
    waiter.join(60)
    problems = settle_jobs(row, submitter.jobs, final, labels, fault_log, back)
    assert not problems, f"{len(problems)} jobs lost, e.g. {problems[:3]}"
    assert not waited, f"waiting for a job across the outage raised {waited[0]!r}"
    for i, exc in submitter.failed:
        assert isinstance(exc, Unavailable) and "was not enqueued" in str(exc), \
            f"row {i}: an unclear submit error {exc!r}"
