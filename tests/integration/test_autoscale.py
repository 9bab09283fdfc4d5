"""``inferq autoscale`` in dry-run against a real Redis broker: fake messages on a model's
queue list, no worker serving it, nothing applied."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import REDIS, REDIS_TEST_DB, need, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def queue() -> Iterator[tuple[dict[str, str], str]]:
    """INFERQ_* for a unique queue prefix on the test database, and the digits queue name;
    the queue's list is deleted after."""
    import redis

    need(6379, "Redis")
    url = f"{REDIS}/{REDIS_TEST_DB}"
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = {"INFERQ_BROKER_URL": url, "INFERQ_RESULT_BACKEND": url,
           "INFERQ_QUEUE_PREFIX": prefix}
    client = redis.Redis.from_url(url)
    name = f"{prefix}infer.digits"
    try:
        yield env, name
    finally:
        client.delete(name)
        client.close()


def test_autoscale_dry_run_reads_the_queue_and_prints_the_command(queue) -> None:
    import redis

    env, name = queue
    redis.Redis.from_url(env["INFERQ_BROKER_URL"]).lpush(name, *[b"fake"] * 5)
    window = ["--models", "digits", "--window", "0.5", "--samples", "3"]

    # Live workers asked: none serves this prefix's queue, so one is needed to start.
    asked = run_cli(["autoscale", *window], env, timeout=60)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"queue {name}: 5 5 5" in asked.stdout
    assert "workers: 0 (live workers" in asked.stdout
    assert "would run: docker compose up -d --no-recreate --scale worker=1 worker" in \
        asked.stdout

    # Two workers said to run, the backlog not moving and no counts: no estimate, exit 3.
    stuck = run_cli(["autoscale", *window, "--workers", "2", "--apply"], env, timeout=60)
    assert stuck.returncode == 3, stuck.stdout + stuck.stderr
    assert "cannot estimate" in stuck.stdout and "nothing changed" in stuck.stdout
    assert "running:" not in stuck.stdout

    # Empty queue: down to --min, shown and not run.
    redis.Redis.from_url(env["INFERQ_BROKER_URL"]).delete(name)
    empty = run_cli(["autoscale", *window, "--workers", "3", "--min", "2"], env, timeout=60)
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert f"queue {name}: 0 0 0" in empty.stdout
    assert "would run: docker compose up -d --no-recreate --scale worker=2 worker" in \
        empty.stdout
