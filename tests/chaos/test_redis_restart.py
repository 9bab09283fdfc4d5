"""A Redis with an append-only file (fsync always), broker and result store at once,
restarted mid-job: results stored before are still there after, the job completes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from producer.bulk.batch import chunk_id
from tests.chaos.harness import (
    STALL_S,
    Background,
    assert_every_row_once,
    collect_during,
    settle,
    tiled,
    worker_env,
)
from tests.conftest import client_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

DOWN_S = 2.0  # long enough for every client to see its connections refused


@pytest.mark.timeout(150)
def test_redis_with_aof_restarted_mid_job(redis_env, start_redis, start_worker, digits,
                                          fault_log, chaos_report):
    row = chaos_report("Redis (AOF, broker + store) restarted", "redis (test-owned)")
    server = start_redis(aof=True)
    env = {**redis_env, "INFERQ_BROKER_URL": server.url(), "INFERQ_RESULT_BACKEND": server.url()}
    x, labels = tiled(digits, 20_000)
    start_worker(worker_env(env, fault_log, "row_delay_ms=0.16"), "--concurrency", "4")
    client, reader = client_for(env), client_for(env)  # the reader checks from outside
    handle = client.submit_many("digits", x, chunk_rows=500)
    row.jobs, row.rows = len(handle.chunks), len(x)
    ids = [chunk_id(handle.batch_id, i) for i in range(len(handle.chunks))]
    stored: dict[str, np.ndarray] = {}
    back: list[float] = []

    def restart() -> None:
        for job_id, meta in zip(ids, reader.store.fetch_many(ids), strict=True):
            if meta is not None and meta.get("status") == "SUCCESS":
                stored[job_id] = meta["result"]["outputs"]["label"]
        server.stop()  # SIGTERM: Redis fsyncs the append-only file and exits
        time.sleep(DOWN_S)  # the outage itself
        server.start()
        back.append(time.monotonic())
        again = reader.store.fetch_many(list(stored))
        for (job_id, label), meta in zip(stored.items(), again, strict=True):
            assert meta is not None and meta.get("status") == "SUCCESS", \
                f"{job_id}: stored before the restart, {meta and meta.get('status')} after"
            np.testing.assert_array_equal(meta["result"]["outputs"]["label"], label)

    fault = Background(restart)
    parts = collect_during(fault, handle.iter_results(timeout=STALL_S),
                           lambda n: n == 8 and fault.start())
    answered = settle(row, parts, len(x), fault_log, back[0])
    assert len(stored) >= 8, "the restart came before any result was stored"
    assert_every_row_once(parts, answered, labels)
