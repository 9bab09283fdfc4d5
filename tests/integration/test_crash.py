"""Nothing is lost when a worker is SIGKILLed in the middle of a job."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import client_for, wait_until

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
    second_rows = sum(s["digits@1"]["rows"] for reply in stats for name, s in reply.items()
                      if name.startswith("second@"))  # not other tests' workers on RabbitMQ
    print(f"\n[{broker_env['INFERQ_BROKER_URL'].split(':')[0]}] killed the first worker after "
          f"5 of 40 chunks had been collected; the second ran {second_rows} of the other "
          f"{10_000 - 5 * 250} rows; 0 rows lost, each row has exactly one result; "
          f"chunks sent again as lost: {handle.pipeline.resent}")


def test_a_chunk_lost_from_the_queue_is_sent_again(redis_env, start_worker, digits,
                                                   monkeypatch):
    """kombu's Redis transport pops a message (BRPOP) before it records it as unacked; a
    worker SIGKILLed in between loses it. Simulated by deleting one chunk's message: the
    pipeline sees it unclaimed while later chunks finish, and sends it again."""
    import threading

    import redis

    from producer.bulk import batch as bulk

    monkeypatch.setattr(bulk, "LOST_AFTER_S", 1.0)
    client = client_for(redis_env)
    handle = client.submit_many("digits", digits["x"][:2000], chunk_rows=250)
    results: list = []
    collector = threading.Thread(target=lambda: results.extend(handle.iter_results(60)))
    collector.start()  # publishes all 8 chunks, then waits: no worker yet
    r = redis.Redis.from_url(redis_env["INFERQ_BROKER_URL"])
    queue = redis_env["INFERQ_QUEUE_PREFIX"] + "infer.digits"
    wait_until(lambda: r.llen(queue) >= 8, 30, "the 8 chunks published")
    lost = f"{handle.batch_id}-0000002".encode()
    victim = next(raw for raw in r.lrange(queue, 0, -1) if lost in raw)
    assert r.lrem(queue, 1, victim) == 1
    start_worker(redis_env)
    collector.join(90)
    assert not collector.is_alive()
    rows = np.concatenate([np.arange(p.start, p.start + p.rows) for p in results])
    np.testing.assert_array_equal(rows, np.arange(2000))
    np.testing.assert_array_equal(np.concatenate([p.outputs["label"] for p in results]),
                                  digits["label"][:2000])
    assert handle.pipeline.resent == 1


def test_a_lost_single_job_is_sent_again_while_waited_for(redis_env, start_worker, digits,
                                                          monkeypatch):
    """The same BRPOP window for a single job: its message is deleted from the queue; a job
    sent after it finishes, so the waiting client sends the lost one again."""
    import time

    import redis

    from producer import client as client_module

    monkeypatch.setattr(client_module, "LOST_AFTER_S", 1.0)
    client = client_for(redis_env)
    lost = client.submit("digits", digits["x"][7])
    later = client.submit("digits", digits["x"][8])
    r = redis.Redis.from_url(redis_env["INFERQ_BROKER_URL"])
    queue = redis_env["INFERQ_QUEUE_PREFIX"] + "infer.digits"
    victim = next(raw for raw in r.lrange(queue, 0, -1) if lost.id.encode() in raw)
    assert r.lrem(queue, 1, victim) == 1
    start_worker(redis_env)
    assert int(later.result(timeout=30)["label"][0]) == int(digits["label"][8])
    started = time.monotonic()
    assert int(lost.result(timeout=30)["label"][0]) == int(digits["label"][7])
    assert client.inflight.resent == 1
    print(f"\nthe lost job was sent again and answered {time.monotonic() - started:.1f} s "
          "into its wait")
