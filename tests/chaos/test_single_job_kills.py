"""Single jobs nobody waits for, under repeated SIGKILLs: every job ends, none is lost.

Web backends post one-row jobs (over HTTP, and with the SDK's ``submit``) and poll later;
no client resends anything. Meanwhile a bulk job runs, and workers are SIGKILLed at
random moments, each replaced at once. Before the reliable Redis fetch
(shared/redis_transport.py) about one kill in seven landed between kombu's BRPOP and its
unacked record and lost the message (8 jobs in 20 kills); run this module with
``INFERQ_RELIABLE_FETCH=false`` to see that again.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.chaos.harness import (
    Submitter,
    assert_every_row_once,
    await_results,
    broker_name,
    collect,
    job_problems,
    settle,
    tiled,
    worker_env,
)
from tests.conftest import client_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

KEY = "chaos-key"


class HttpPoster:
    """Threads posting one-row jobs to ``inferq api`` (no ``?wait``) until stopped; a 429
    (the backlog is over the API's queue limit) is retried after its Retry-After, as a
    client should."""

    def __init__(self, url: str, x: np.ndarray, first: int, threads: int = 2):
        self.url, self.x, self._next = url, x, first
        self.jobs: dict[str, int] = {}
        self.failed: list[str] = []
        self.throttled = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as http:
            while not self._stop.is_set():
                with self._lock:
                    i, self._next = self._next, self._next + 1
                if i >= len(self.x):
                    return
                r = http.post("/v1/models/digits/jobs", json={"inputs": self.x[i].tolist()})
                while r.status_code == 429 and not self._stop.is_set():
                    self.throttled += 1
                    self._stop.wait(float(r.headers.get("retry-after", "1")))
                    r = http.post("/v1/models/digits/jobs", json={"inputs": self.x[i].tolist()})
                if r.status_code == 429:
                    return
                with self._lock:
                    if r.status_code == 202:
                        self.jobs[r.json()["id"]] = i
                    else:
                        self.failed.append(f"row {i}: {r.status_code} {r.text[:200]}")
                self._stop.wait(0.01)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _kill_at_random(kills: int, workers: list[Any], restart: Any, seed: int,
                    log: list[float]) -> None:
    """``kills`` SIGKILLs, each of a worker at a random moment 0.02-0.8 s after it was
    ready (serving), alternating between the slots; each killed worker replaced at once."""
    rng = random.Random(seed)
    for k in range(kills):
        slot = k % len(workers)
        workers[slot].wait_ready()
        time.sleep(rng.uniform(0.02, 0.8))
        workers[slot].kill(signal.SIGKILL)
        log.append(time.monotonic())
        workers[slot] = restart(f"w{slot}-{k + 1}@%h")


def _single_jobs_under_kills(broker_env: dict[str, str], start_worker: Any, start_api: Any,
                             digits: Any, fault_log: Any, chaos_report: Any, kills: int
                             ) -> None:
    row = chaos_report(f"SIGKILL at random x{kills}: single jobs (HTTP + SDK) + bulk",
                       broker_name(broker_env))
    # 1 ms per row keeps messages in flight in the workers when the kills land. After each
    # kill the returned messages run row by row (poison isolation), so on a busy machine a
    # job can wait in a worker for longer than the fixtures' 8 s visibility timeout, after
    # which it fails (TimeoutError): 60 s here, as Redis recovery comes from heartbeats.
    env = worker_env({**broker_env, "INFERQ_VISIBILITY_TIMEOUT": "60"}, fault_log,
                     "row_delay_ms=1")

    def restart(name: str) -> Any:
        return start_worker(env, "--hostname", name, ready=False)

    workers = [restart("w0-0@%h"), restart("w1-0@%h")]
    for w in workers:
        w.wait_ready()
    api = start_api({**broker_env, "INFERQ_API_KEYS": f"acme:{KEY}",
                     "INFERQ_API_RATE_PER_S": "0"})
    client = client_for(broker_env)
    x, labels = tiled(digits, 40_000)
    sdk = Submitter(client, x[:20_000], threads=3, every_s=0.01)
    http = HttpPoster(api.url, x, first=20_000)
    bulk_x, bulk_labels = tiled(digits, 10_000)
    handle = client.submit_many("digits", bulk_x, chunk_rows=250)
    bulk_parts: list[Any] = []
    collector = threading.Thread(target=lambda: bulk_parts.extend(
        collect(handle.iter_results(timeout=120))), daemon=True)
    kill_times: list[float] = []
    sdk.start()
    http.start()
    collector.start()
    try:
        _kill_at_random(kills, workers, restart, seed=kills, log=kill_times)
    finally:
        sdk.stop()
        http.stop()
    assert not sdk.failed, sdk.failed[:3]
    assert not http.failed, http.failed[:3]
    jobs = {**sdk.jobs, **http.jobs}
    row.jobs, row.rows = len(jobs) + len(handle.chunks), len(jobs) + len(bulk_x)
    final = await_results(client, list(jobs), timeout=90 + 2 * kills)
    collector.join(120)
    problems = job_problems(jobs, final, labels)
    answered = settle(row, bulk_parts, len(bulk_x), fault_log, kill_times[-1])
    row.lost = (row.lost or 0) + len(problems)
    row.note = (f"{len(sdk.jobs)} SDK + {len(http.jobs)} HTTP jobs, "
                f"{len(handle.chunks)} bulk chunks, {http.throttled} 429s retried")
    if row.lost:
        row.recovery_s = None
    assert not problems, f"{len(problems)} of {len(jobs)} jobs: {problems[:5]}"
    assert_every_row_once(bulk_parts, answered, bulk_labels)


@pytest.mark.timeout(300)
def test_single_jobs_survive_20_random_sigkills(broker_env, start_worker, start_api, digits,
                                                fault_log, chaos_report):
    _single_jobs_under_kills(broker_env, start_worker, start_api, digits, fault_log,
                             chaos_report, kills=20)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_single_jobs_survive_60_random_sigkills(broker_env, start_worker, start_api, digits,
                                                fault_log, chaos_report):
    _single_jobs_under_kills(broker_env, start_worker, start_api, digits, fault_log,
                             chaos_report, kills=60)
