"""End to end through real brokers and real worker processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from shared.celery_app import INFER_TASK
from shared.queues import model_queue
from tests.conftest import ROOT, client_for

pytestmark = pytest.mark.integration


def test_bulk_10k_rows_match_in_process_onnx(broker_env, start_worker, digits):
    start_worker(broker_env)
    client = client_for(broker_env)
    handle = client.submit_many("digits", digits["x"], chunk_rows=500)
    result = handle.results(timeout=60)
    assert len(result) == 10_000
    assert result.errors == {}
    assert result.ok.all()
    np.testing.assert_array_equal(result.outputs["label"], digits["label"])
    np.testing.assert_allclose(result.outputs["probabilities"], digits["probabilities"],
                               rtol=1e-5, atol=1e-6)
    assert (result.outputs["label"] == digits["y"]).mean() > 0.97


def test_concurrent_single_row_jobs_are_batched(redis_env, start_worker, digits):
    """200 single-row jobs from 8 threads. They are queued before the worker starts, so
    the worker meets a backlog (as after a burst) whatever the speed of this machine."""
    client = client_for(redis_env)
    rows = digits["x"][:200]
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda i: client.submit("digits", rows[i]), range(200)))
    assert {client.get(j.id).status.value for j in jobs} == {"queued"}
    worker = start_worker(redis_env, "--concurrency", "32")
    done = [(i, job.id, job.result(timeout=60)) for i, job in enumerate(jobs)]
    for i, _, outputs in done:
        assert outputs["label"][0] == digits["label"][i]
        np.testing.assert_allclose(outputs["probabilities"][0], digits["probabilities"][i],
                                   rtol=1e-5, atol=1e-6)
    sizes = [max(client.get(job_id).batch_rows) for _, job_id, _ in done]
    print("batch sizes seen by 200 concurrent single-row jobs:", sorted(set(sizes)))
    assert max(sizes) > 1, f"every job ran alone: {sizes}"
    # The worker's own record, over the control channel.
    replies = client.app.control.broadcast("inferq_stats", reply=True, timeout=5)
    assert replies, "the worker did not answer inferq_stats"
    stats = next(iter(replies[0].values()))["digits@1"]
    assert stats["rows"] >= 200 and stats["calls"] < stats["rows"], stats
    assert worker.proc.poll() is None


def test_a_bad_row_fails_alone(broker_env, start_worker, digits):
    """A NaN row sent straight to the queue (no producer checks) and a row that makes the
    model raise: each fails with its own message; every neighbour gets its result."""
    start_worker({**broker_env, "INFERQ_FAULT_INJECTION": "raise_on=-7"})
    client = client_for(broker_env)
    x = digits["x"][:100].copy()
    x[10, 0, 0, 0] = np.nan
    x[42, 0, 0, 0] = -7
    client.app.send_task(INFER_TASK, kwargs={"model": "digits", "inputs": {"image": x}},
                         task_id="raw-bad-rows", queue=model_queue(client.settings, "digits"))
    res = client.wait("raw-bad-rows", timeout=60)
    by_row = {e.row: e.message for e in res.errors}
    assert sorted(by_row) == [10, 42]
    assert "row 10" in by_row[10] and "'image'" in by_row[10] and "NaN" in by_row[10]
    assert "row 42" in by_row[42] and "injected fault" in by_row[42]
    good = np.setdiff1d(np.arange(100), [10, 42])
    np.testing.assert_array_equal(res.outputs["label"][good], digits["label"][good])


def test_submit_validates_before_sending(redis_env, digits):
    from shared.errors import InputError, ModelNotFound

    client = client_for(redis_env)
    with pytest.raises(InputError, match=r"expected shape \(1, 8, 8\).*got shape \(63,\)"):
        client.submit("digits", np.zeros(63))
    with pytest.raises(InputError, match="dtype"):
        client.submit("digits", [["a"] * 8] * 8)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        client.submit("nope", digits["x"][0])


def test_job_outlives_its_producer(redis_env, start_worker, digits):
    """A job submitted by a process that has exited is read by id from another process."""
    start_worker(redis_env)
    env_args = repr({k: v for k, v in redis_env.items()})
    script = textwrap.dedent(f"""
        import numpy as np
        from tests.conftest import client_for
        from workers.build.digits import load_digits_data
        x, _ = load_digits_data()
        job = client_for({env_args}).submit("digits", x[5])
        print(job.id)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    res = client_for(redis_env).wait(job_id, timeout=60)
    assert res.status.value == "succeeded"
    assert res.outputs["label"][0] == digits["label"][5]
    assert res.model == "digits" and res.version == 1
    import redis

    ttl = redis.Redis.from_url(redis_env["INFERQ_RESULT_BACKEND"]).ttl(
        f"celery-task-meta-{job_id}")
    assert 0 < ttl <= int(redis_env["INFERQ_RESULT_EXPIRES"])  # kept, as configured


def test_unknown_job_id_is_reported(redis_env):
    from shared.errors import JobNotFound

    with pytest.raises(JobNotFound, match="no job 'missing-id'"):
        client_for(redis_env).get("missing-id")
