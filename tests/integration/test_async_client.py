"""AsyncClient against a real broker and worker: many concurrent awaits hold no threads,
results match the model in process, jobs sent elsewhere are awaited, cancel and timeouts
answer as the sync Client does."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from producer.aclient import AsyncClient
from shared.errors import JobCancelled
from shared.schemas import JobStatus
from tests.conftest import client_for

pytestmark = pytest.mark.integration


def test_many_concurrent_awaits_match_in_process_without_a_thread_each(
        broker_env, start_worker, digits) -> None:
    start_worker(broker_env)
    threads_before = threading.active_count()
    peak = 0

    async def main() -> list[dict[str, np.ndarray]]:
        nonlocal peak
        async with AsyncClient(client=client_for(broker_env)) as client:
            jobs = await asyncio.gather(*(client.submit("digits", digits["x"][i])
                                          for i in range(300)))
            waits = [asyncio.ensure_future(job.result(timeout=60)) for job in jobs]
            while not all(w.done() for w in waits):
                peak = max(peak, threading.active_count())
                await asyncio.sleep(0.005)
            print(f"\n300 jobs in {client.coalescer.messages} messages; threads "
                  f"{threads_before} before, {peak} at most while waiting")
            assert client.coalescer.messages < 300  # concurrent submits shared messages
            return [w.result() for w in waits]

    outputs = asyncio.run(main())
    for i, out in enumerate(outputs):
        assert int(out["label"][0]) == int(digits["label"][i])
        np.testing.assert_allclose(out["probabilities"][0], digits["probabilities"][i],
                                   rtol=1e-5, atol=1e-6)
    # 300 waits, and no thread for any of them: the sends' thread pool and listeners only
    assert peak - threads_before <= 12, (threads_before, peak)


def test_a_job_sent_by_another_client_is_awaited_on_its_channel(redis_env, start_worker,
                                                                 digits) -> None:
    sync = client_for(redis_env)
    job = sync.submit("digits", digits["x"][5])  # not this AsyncClient's: no reply for it

    async def main() -> None:
        async with AsyncClient(client=client_for(redis_env)) as client:
            start_worker(redis_env, ready=False)  # the wait starts before a worker exists
            res = await client.wait(job.id, timeout=60)
            assert res.status is JobStatus.succeeded, res
            assert res.outputs is not None
            assert int(res.outputs["label"][0]) == int(digits["label"][5])

    asyncio.run(main())


def test_cancel_and_timeout_without_a_worker(redis_env, digits) -> None:
    async def main() -> None:
        async with AsyncClient(client=client_for(redis_env)) as client:
            job = await client.submit("digits", digits["x"][0])
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=f"job {job.id} not finished after 0.3 s "
                               r"\(status queued\)"):
                await client.wait(job.id, timeout=0.3)
            assert time.monotonic() - started < 2
            assert await job.status() is JobStatus.queued
            assert await client.cancel(job.id) is True
            with pytest.raises(JobCancelled):
                await job.result(timeout=5)

    asyncio.run(main())


def test_bad_input_is_refused_before_sending(redis_env) -> None:
    from shared.errors import InputError

    async def main() -> None:
        async with AsyncClient(client=client_for(redis_env)) as client:
            with pytest.raises(InputError, match="image"):
                await client.submit("digits", np.zeros(5, np.float32))
            assert client.coalescer.messages == 0

    asyncio.run(main())


def test_the_embedded_default_needs_no_broker(model_repo, tmp_path, digits) -> None:
    """No broker configured: a worker in this process; waits poll the file store."""
    from producer.client import Client
    from shared.settings import load_settings
    from workers import main as worker_main

    settings = load_settings(model_repo=str(model_repo), home=str(tmp_path / "home"))
    assert settings.embedded
    client = Client(settings)
    with worker_main.embedded_worker(settings, client.app, ["digits"]):
        async def main() -> list[dict[str, np.ndarray]]:
            async with AsyncClient(client=client) as aclient:
                assert aclient.notifier is None  # the file store cannot publish
                jobs = await asyncio.gather(*(aclient.submit("digits", digits["x"][i])
                                              for i in range(40)))
                return await asyncio.gather(*(job.result(timeout=60) for job in jobs))

        outputs = asyncio.run(main())
    assert [int(o["label"][0]) for o in outputs] == [int(v) for v in digits["label"][:40]]
