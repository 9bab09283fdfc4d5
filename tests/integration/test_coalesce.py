"""Coalesced submits through a real worker: many jobs per message, each with its own
result; a bad job or a cancelled one inside a shared message does not touch the others."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from shared.celery_app import INFER_MANY_TASK
from shared.queues import model_queue
from shared.schemas import JobStatus
from tests.conftest import client_for

pytestmark = pytest.mark.integration


def test_concurrent_submits_share_messages_and_match_in_process(broker_env, start_worker,
                                                                  digits) -> None:
    start_worker(broker_env)
    client = client_for(broker_env)
    jobs: dict[int, str] = {}
    lock = threading.Lock()

    def submit(first: int) -> None:
        for i in range(first, 400, 16):
            job = client.submit("digits", digits["x"][i])
            with lock:
                jobs[i] = job.id

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(jobs) == 400
    for i, job_id in jobs.items():
        res = client.wait(job_id, timeout=30)
        assert res.status is JobStatus.succeeded, res
        assert res.outputs is not None
        assert int(res.outputs["label"][0]) == int(digits["label"][i])
        np.testing.assert_allclose(res.outputs["probabilities"][0], digits["probabilities"][i],
                                   rtol=1e-5, atol=1e-6)
    co = client.coalescer
    print(f"\n400 jobs from 16 threads in {co.messages} messages")
    assert co.jobs == 400 and co.messages < 400


def test_a_bad_or_cancelled_job_in_a_shared_message_fails_alone(redis_env, start_worker,
                                                                digits) -> None:
    client = client_for(redis_env)
    ids = [uuid.uuid4().hex for _ in range(4)]
    rows = [digits["x"][0], np.zeros(5, np.float32), digits["x"][2], digits["x"][3]]
    jobs = [{"id": j, "inputs": {"image": r[None]}, "submitted_at": 0.0}
            for j, r in zip(ids, rows, strict=True)]
    jobs[2]["deadline"] = time.time() + 600  # still ahead: runs
    late = uuid.uuid4().hex
    jobs.append({"id": late, "inputs": {"image": rows[0][None]}, "submitted_at": 0.0,
                 "deadline": time.time() - 1})  # passed: not run, its neighbours are
    bad_and_cancelled = uuid.uuid4().hex
    jobs.append({"id": bad_and_cancelled, "inputs": {"image": rows[1][None]},
                 "submitted_at": 0.0})
    for j in [*ids, bad_and_cancelled]:
        client.store.mark_queued(j, {"model": "digits"})
    # cancelled before any worker saw them (the worker's rows run while their claims
    # travel: nothing of the run may show)
    assert client.store.cancel([ids[3], bad_and_cancelled]) == [True, True]
    client.app.send_task(INFER_MANY_TASK, task_id=f"many-{uuid.uuid4().hex}",
                         kwargs={"model": "digits", "jobs": jobs},
                         queue=model_queue(client.settings, "digits"))
    start_worker(redis_env)
    good = [client.wait(ids[i], timeout=30) for i in (0, 2)]
    for i, res in zip((0, 2), good, strict=True):
        assert res.status is JobStatus.succeeded and not res.errors
        assert res.outputs is not None
        assert int(res.outputs["label"][0]) == int(digits["label"][i])
    bad = client.wait(ids[1], timeout=30)  # refused whole, as `inferq.infer` refuses it
    assert bad.status is JobStatus.failed and bad.error is not None
    assert "'image'" in bad.error and "shape" in bad.error, bad.error
    assert client.get(ids[3]).status is JobStatus.cancelled
    assert client.get(bad_and_cancelled).status is JobStatus.cancelled
    assert client.wait(late, timeout=30).status is JobStatus.expired
