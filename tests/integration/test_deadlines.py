"""Deadlines and priorities, through real brokers and a real worker process."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shared.errors import InputError, JobExpired
from shared.schemas import JobStatus
from tests.conftest import client_for

pytestmark = pytest.mark.integration


def test_a_job_past_its_deadline_is_not_run_and_reports_expired(broker_env, start_worker,
                                                                digits):
    client = client_for(broker_env)
    late = client.submit("digits", digits["x"][0], expires_in=0.3)
    timely = client.submit("digits", digits["x"][1], expires_in=120)
    late_chunks = client.submit_many("digits", digits["x"][:50], chunk_rows=25,
                                     expires_in=0.3)
    time.sleep(0.6)  # nothing serves the queue yet: the short deadlines pass
    worker = start_worker(broker_env)
    assert int(timely.result(timeout=30)["label"][0]) == int(digits["label"][1])
    res = client.wait(late.id, timeout=30)
    assert res.status is JobStatus.expired
    assert res.outputs is None and "deadline" in (res.error or "")
    with pytest.raises(JobExpired):
        late.result(timeout=5)
    batch = late_chunks.results(timeout=30)
    assert sorted(batch.errors) == list(range(50)) and not batch.ok.any()
    assert all("JobExpired" in m for m in batch.errors.values())
    # Only this test's worker: other workers may share the RabbitMQ broadcast exchange.
    stats = client.app.control.broadcast("inferq_stats", reply=True, timeout=5)
    rows = sum(s["rows"] for reply in stats for name, w in reply.items()
               if name.startswith(f"inferq.{worker.pid}@") for s in w.values())
    assert rows == 1  # only the timely job reached the model


@pytest.mark.parametrize("bad", [0, -1, "soon", float("nan")])
def test_a_bad_expires_in_is_refused_naming_the_field(redis_env, bad, digits):
    client = client_for(redis_env)
    with pytest.raises(InputError, match="expires_in") as err:
        client.submit("digits", digits["x"][0], expires_in=bad)
    assert err.value.field == "expires_in"


def test_an_unknown_priority_is_refused_naming_the_field(redis_env, digits):
    client = client_for(redis_env)
    with pytest.raises(InputError, match="priority") as err:
        client.submit("digits", digits["x"][0], priority="urgent")
    assert err.value.field == "priority"


def test_high_priority_jobs_skip_the_normal_backlog(broker_env, start_worker, digits):
    """300 normal jobs wait in the queue; then 3 high ones. One worker thread with a slow
    (10 ms) model call serves them: the high jobs end before nearly all the normal ones."""
    env = {**broker_env, "INFERQ_FAULT_INJECTION": "delay_ms=10", "INFERQ_COALESCE": "false"}
    client = client_for(env)
    normal = [client.submit("digits", digits["x"][i]) for i in range(300)]
    high = [client.submit("digits", digits["x"][i], priority="high") for i in range(3)]
    start_worker(env, "--concurrency", "1")
    ends = {j.id: client.wait(j.id, timeout=90).finished_at for j in high + normal}
    normal_ends = np.sort([ends[j.id] for j in normal])
    high_last = max(ends[j.id] for j in high)
    ahead = int(np.searchsorted(normal_ends, high_last))
    print(f"\n[{env['INFERQ_BROKER_URL'].split(':')[0]}] the last high job ended after "
          f"{ahead} of 300 normal jobs that were queued before it")
    assert ahead <= 15
