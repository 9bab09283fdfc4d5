"""Workers killed mid-job (SIGKILL, SIGTERM, one of two every ~2 s): no row is lost,
every row gets exactly one result, equal to the in-process model's."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from tests.chaos.harness import (
    STALL_S,
    assert_every_row_once,
    await_next_call,
    broker_name,
    collect,
    rows_run,
    settle,
    tiled,
    worker_env,
)
from tests.conftest import client_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

# 0.16 ms per row (injected; ~40 ms per 256-row call) makes a 20,000-row job last a few
# seconds on one worker, which is inside a model call almost all of that time.
SLOW = "row_delay_ms=0.16"


def _bulk_on_one_slow_worker(broker_env: dict[str, str], start_worker: Any, digits: Any,
                             fault_log: Any, row: Any) -> tuple[Any, ...]:
    """20,000 rows in 500-row chunks sent to one slow worker named first@:
    (rows, labels, the worker env, the worker, the batch handle)."""
    x, labels = tiled(digits, 20_000)
    env = worker_env(broker_env, fault_log, SLOW)
    first = start_worker(env, "--concurrency", "4", "--hostname", "first@%h")
    handle = client_for(broker_env).submit_many("digits", x, chunk_rows=500)
    row.jobs, row.rows = len(handle.chunks), len(x)
    return x, labels, env, first, handle


@pytest.mark.timeout(150)
def test_sigkill_mid_batch_loses_nothing(broker_env, start_worker, digits, fault_log,
                                         chaos_report):
    row = chaos_report("SIGKILL a worker mid-batch", broker_name(broker_env))
    x, labels, env, first, handle = _bulk_on_one_slow_worker(broker_env, start_worker,
                                                             digits, fault_log, row)
    killed: list[float] = []

    def kill_at(n: int) -> None:
        if n == 8:  # 4,000 rows answered in order, more running
            # Right after a model call returns the worker is inside the next one, and the
            # chunks in flight have some of their rows run: those are run again.
            await_next_call(fault_log, first.pid)
            first.kill(signal.SIGKILL)
            killed.append(time.monotonic())
            start_worker(env, "--concurrency", "4", "--hostname", "second@%h")

    parts = collect(handle.iter_results(timeout=STALL_S), kill_at)
    answered = settle(row, parts, len(x), fault_log, killed[0])
    assert first.proc.returncode == -signal.SIGKILL
    assert_every_row_once(parts, answered, labels)


@pytest.mark.timeout(150)
def test_sigterm_mid_job_finishes_or_returns_in_flight_work(broker_env, start_worker, digits,
                                                           fault_log, chaos_report):
    row = chaos_report("SIGTERM a worker mid-job", broker_name(broker_env))
    x, labels, env, first, handle = _bulk_on_one_slow_worker(broker_env, start_worker,
                                                             digits, fault_log, row)
    stopped: list[float] = []

    def stop_at(n: int) -> None:
        if n == 8:
            before = rows_run(fault_log, first.pid)
            first.proc.send_signal(signal.SIGTERM)  # warm shutdown
            first.proc.wait(timeout=30)
            stopped.append(time.monotonic())
            row.note = f"{rows_run(fault_log, first.pid) - before} rows run after SIGTERM"
            start_worker(env, "--concurrency", "4", "--hostname", "second@%h")

    parts = collect(handle.iter_results(timeout=STALL_S), stop_at)
    answered = settle(row, parts, len(x), fault_log, stopped[0])
    assert first.proc.returncode == 0, "the warm shutdown did not end cleanly"
    assert "Warm shutdown" in first.log.read_text(errors="replace")
    assert_every_row_once(parts, answered, labels)


def _kill_one_every(period: float, kills: int, workers: list, restart, done: threading.Event,
                    log: list[float]) -> None:
    """SIGKILL workers[0], workers[1], workers[0]... at ``period``, 2 ``period``... s
    (restarts included), each replaced at once, until ``kills`` or the job is done;
    ``log`` gets each kill's time."""
    start = time.monotonic()
    for k in range(kills):
        if done.wait(max(0.0, start + (k + 1) * period - time.monotonic())):
            return
        slot = k % len(workers)
        workers[slot].kill(signal.SIGKILL)
        log.append(time.monotonic())
        workers[slot] = restart(f"w{slot}-{k + 1}@%h")


def _kill_every_2s(env_for_row, start_worker, digits, fault_log, chaos_report, *, rows: int,
                   kills: int, row_ms: float, label: str):
    row = chaos_report(label, broker_name(env_for_row))
    x, labels = tiled(digits, rows)
    # ``row_ms`` per row stretches the job over the kills (~1/row_ms rows/ms a worker).
    env = worker_env(env_for_row, fault_log, f"row_delay_ms={row_ms}")

    def restart(name: str):
        return start_worker(env, "--concurrency", "2", "--hostname", name)

    workers = [restart("w0-0@%h"), restart("w1-0@%h")]
    handle = client_for(env_for_row).submit_many("digits", x, chunk_rows=250)
    row.jobs, row.rows = len(handle.chunks), len(x)
    done = threading.Event()
    kill_times: list[float] = []
    killer = threading.Thread(target=_kill_one_every,
                              args=(2.0, kills, workers, restart, done, kill_times))
    killer.start()
    try:
        parts = collect(handle.iter_results(timeout=STALL_S))
    finally:
        done.set()
        killer.join(60)
    answered = settle(row, parts, len(x), fault_log, kill_times[-1] if kill_times else None)
    assert len(kill_times) == kills, (f"the job ended after {len(kill_times)} of {kills} "
                                      "kills: make it longer")
    assert_every_row_once(parts, answered, labels)


# Redis only here (its visibility timeout makes it the slower to recover); the soak
# below runs both brokers.
@pytest.mark.parametrize("broker_env", ["redis"], indirect=True)
@pytest.mark.timeout(180)
def test_one_of_two_workers_killed_every_2s(broker_env, start_worker, digits, fault_log,
                                            chaos_report):
    _kill_every_2s(broker_env, start_worker, digits, fault_log, chaos_report, rows=30_000,
                   kills=4, row_ms=0.8, label="SIGKILL 1 of 2 workers every 2 s (x4)")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_one_of_two_workers_killed_every_2s_for_2_minutes(broker_env, start_worker,
                                                               digits, fault_log,
                                                               chaos_report):
    _kill_every_2s(broker_env, start_worker, digits, fault_log, chaos_report, rows=200_000,
                   kills=60, row_ms=1.4, label="soak: SIGKILL 1 of 2 workers every 2 s for 2 min")
