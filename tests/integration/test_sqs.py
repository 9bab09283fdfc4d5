"""Amazon SQS as the broker (kombu's SQS transport, result store on Redis), over the real
SQS protocol of moto's standalone server: jobs and bulk chunks that fit its message limit,
malformed messages that never stop a worker, and a worker killed mid-job losing nothing.
(10,000 rows through SQS with models from a bucket: test_bucket_repository.py.)"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from shared.dead_letters import read_dead_letters
from shared.errors import InputError
from tests.conftest import (
    REDIS,
    REDIS_TEST_DB,
    _cleanup,
    _settings_env,
    client_for,
    need,
    wait_until,
)
from tests.integration.test_hostile_messages import start_and_send_crafted
from tests.moto_server import moto_server

pytestmark = pytest.mark.integration
boto3 = pytest.importorskip("boto3")
pytest.importorskip("pycurl")  # kombu's SQS transport consumes through it


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as env:
        yield env


@pytest.fixture
def sqs_env(aws, model_repo: Path, tmp_path: Path, monkeypatch) -> Iterator[dict[str, str]]:
    need(6379, "Redis")
    for key, value in aws.items():  # this process's clients (the SDK) too
        monkeypatch.setenv(key, value)
    env = {**_settings_env("sqs://", f"{REDIS}/{REDIS_TEST_DB}", model_repo,
                           tmp_path / "home", INFERQ_VISIBILITY_TIMEOUT="6"), **aws}
    yield env
    _cleanup(env)


def _sqs(aws: dict[str, str]):  # noqa: ANN202 - a boto3 client
    return boto3.client("sqs", endpoint_url=aws["AWS_ENDPOINT_URL"],
                        region_name=aws["AWS_DEFAULT_REGION"])


def test_jobs_and_bulk_through_sqs(sqs_env, start_worker, digits):
    start_worker(sqs_env)
    client = client_for(sqs_env)
    job = client.submit("digits", digits["x"][:3])
    np.testing.assert_array_equal(job.result(timeout=30)["label"], digits["label"][:3])
    batch = client.submit_many("digits", digits["x"][:3000])
    assert len(batch.chunks) == 6  # 512-row chunks: 128 KiB of input per message
    outputs = batch.results(timeout=120).outputs
    np.testing.assert_array_equal(outputs["label"], digits["label"][:3000])
    with pytest.raises(InputError, match="256,000 bytes of input, over the 128 KiB one "
                       "Amazon SQS message"):
        client.submit("digits", digits["x"][:1000])  # 256 KB in one job: bulk, please


def test_malformed_messages_on_sqs_never_stop_a_worker(sqs_env, aws, start_worker, digits):
    worker, client, queue, crafted = start_and_send_crafted(sqs_env, start_worker)
    sqs = _sqs(aws)
    url = sqs.get_queue_url(QueueName=queue.name.replace(".", "-"))["QueueUrl"]
    raw = ["not json", "[1, 2]", '{"properties": 3}', "@@@" * 1000,
           '{"body": "", "headers": null, "properties": {"delivery_info": {}}}']
    for body in raw:  # straight onto the queue, not even kombu's envelope
        sqs.send_message(QueueUrl=url, MessageBody=body)
    good = client.submit("digits", digits["x"][5])
    assert int(good.result(timeout=30)["label"][0]) == int(digits["label"][5])
    store = redis.Redis.from_url(sqs_env["INFERQ_RESULT_BACKEND"])
    expected = len(crafted) + len(raw)
    entries = wait_until(lambda: (found := read_dead_letters(
        store, sqs_env["INFERQ_QUEUE_PREFIX"], limit=100)) and len(found) >= expected
        and found, 30, f"{expected} dead letters")
    print("\n" + "\n".join(sorted(str(e["reason"]) for e in entries)))
    assert worker.proc.poll() is None
    assert "Unrecoverable error" not in worker.log.read_text(errors="replace")
    again = client.submit("digits", digits["x"][6])
    assert int(again.result(timeout=30)["label"][0]) == int(digits["label"][6])
    assert sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
        "Attributes"]["ApproximateNumberOfMessages"] == "0"  # nothing left to loop on


def test_a_worker_killed_mid_job_loses_nothing_on_sqs(sqs_env, start_worker, digits):
    """SQS hides a received message for the visibility timeout (6 s here) and shows it
    again unless it was deleted (acked after its result is stored): a job whose worker
    died runs again on another."""
    slow = start_worker({**sqs_env, "INFERQ_FAULT_INJECTION": "delay_ms=4000"})
    client = client_for(sqs_env)
    jobs = [client.submit("digits", digits["x"][i]) for i in range(4)]
    store = redis.Redis.from_url(sqs_env["INFERQ_RESULT_BACKEND"])
    wait_until(lambda: any(store.exists(f"inferq-claim-{j.id}") or
                           client.get(j.id).status.value == "running" for j in jobs),
               30, "a job running on the slow worker")
    os.kill(slow.pid, signal.SIGKILL)
    slow.proc.wait(timeout=10)
    started = time.monotonic()
    start_worker(sqs_env)
    for i, job in enumerate(jobs):
        assert int(job.result(timeout=60)["label"][0]) == int(digits["label"][i])
    print(f"\nall 4 jobs done {time.monotonic() - started:.1f} s after the kill")
