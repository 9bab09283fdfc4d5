"""Nothing is lost when a worker is SIGKILLed in the middle of a job."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import client_for

pytestmark = pytest.mark.integration


def test_sigkill_mid_job_loses_nothing(broker_env, start_worker, digits):
    # A 40 ms model call (injected) keeps the 40-chunk job running long enough to kill.
    slow = {**broker_env, "INFERQ_FAULT_INJECTION": "delay_ms=40"}
    first = start_worker(slow, "--concurrency", "4", "--hostname", "first@%h")
    client = client_for(broker_env)
    handle = client.submit_many("digits", digits["x"], chunk_rows=250)
    parts = []
    for part in handle.iter_results(timeout=90):
        parts.append(part)
        if len(parts) == 5:
            first.kill()  # SIGKILL: no warm shutdown, its reserved messages are unacked
            start_worker(broker_env, "--concurrency", "4", "--hostname", "second@%h")
    labels = np.concatenate([p.outputs["label"] for p in parts])
    rows = np.concatenate([np.arange(p.start, p.start + p.rows) for p in parts])
    assert len(parts) == 40
    np.testing.assert_array_equal(rows, np.arange(10_000))  # every row once, in order
    assert all(p.ok.all() and not p.errors for p in parts)
    np.testing.assert_array_equal(labels, digits["label"])
    stats = client.app.control.broadcast("inferq_stats", reply=True, timeout=5)
    second_rows = sum(s["digits@1"]["rows"] for reply in stats for s in reply.values())
    print(f"\n[{broker_env['INFERQ_BROKER_URL'].split(':')[0]}] killed the first worker after "
          f"5 of 40 chunks had been collected; the second ran {second_rows} of the other "
          f"{10_000 - 5 * 250} rows; 0 rows lost, each row has exactly one result")
