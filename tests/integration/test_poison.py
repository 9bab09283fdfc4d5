"""Poison messages end: a row that kills its worker every time is dead-lettered after a
bounded number of deliveries, and every other row and job still gets its result.

The model is made to ``os._exit`` on a row whose first value is -9 (INFERQ_FAULT_INJECTION
``exit_on``); a supervisor here restarts the worker whenever it dies, as compose's
``restart: unless-stopped`` or Kubernetes would.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis

from shared.dead_letters import read_dead_letters
from shared.errors import JobFailed
from tests.conftest import client_for, run_cli

pytestmark = pytest.mark.integration

POISON = -9.0


class Supervisor:
    """Keeps one worker running: starts a new one whenever the last one died."""

    def __init__(self, start_worker, env: dict[str, str], max_restarts: int = 8):
        self.start_worker = start_worker
        self.env = env
        self.max_restarts = max_restarts
        self.exits: list[int] = []
        self.worker = start_worker(env)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):  # polling a child process: no event to wait on
            code = self.worker.proc.poll()
            if code is None:
                continue
            self.exits.append(code)
            if len(self.exits) > self.max_restarts:
                return
            self.worker = self.start_worker(self.env)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def poison_env(broker_env):
    # A short visibility timeout: on Redis a dead worker's message comes back after it.
    return {**broker_env, "INFERQ_FAULT_INJECTION": f"exit_on={POISON}",
            "INFERQ_VISIBILITY_TIMEOUT": "3"}


def test_a_row_that_kills_the_worker_is_dead_lettered_and_the_rest_complete(
        poison_env, start_worker, digits):
    x = digits["x"][:1000].copy()
    x[600, 0] = POISON
    sup = Supervisor(start_worker, poison_env)
    client = client_for(poison_env)
    try:
        started = time.monotonic()
        result = client.submit_many("digits", x, chunk_rows=250).results(timeout=120)
        took = time.monotonic() - started
    finally:
        sup.stop()
    assert list(result.errors) == [600]
    assert "died 2 times while running this row" in result.errors[600]
    assert "dead-lettered" in result.errors[600]
    ok = np.ones(1000, dtype=bool)
    ok[600] = False
    np.testing.assert_array_equal(result.ok, ok)
    np.testing.assert_array_equal(result.outputs["label"][ok], digits["label"][:1000][ok])
    # Delivery 1 (batched) and 2 (rows one by one) die on it; 3 dies on it again, which
    # blames it twice; 4 skips it. A bounded number of deaths, all of them the poison's.
    assert sup.exits == [17, 17, 17]
    r = redis.Redis.from_url(poison_env["INFERQ_RESULT_BACKEND"])
    [entry] = read_dead_letters(r, poison_env["INFERQ_QUEUE_PREFIX"])
    assert entry["rows"] == [600]
    assert entry["model"] == "digits@1"
    assert entry["inputs"]["image"][0] == POISON or np.asarray(
        entry["inputs"]["image"]).ravel()[0] == POISON
    assert entry["deliveries"] == 4
    assert len(entry["history"]) == 3  # who took it at each redelivery, and when
    print(f"\n[{poison_env['INFERQ_BROKER_URL'].split(':')[0]}] poison row dead-lettered "
          f"after {len(sup.exits)} worker deaths; 999 of 1000 rows answered in {took:.1f} s")


def test_a_killing_single_job_fails_alone_while_others_are_served(
        poison_env, start_worker, digits):
    sup = Supervisor(start_worker, poison_env)
    client = client_for(poison_env)
    try:
        bad_row = digits["x"][0].copy()
        bad_row.flat[0] = POISON
        bad = client.submit("digits", bad_row)
        good = [client.submit("digits", digits["x"][i]) for i in range(1, 41)]
        labels = [int(j.result(timeout=90)["label"][0]) for j in good]
        with pytest.raises(JobFailed, match="died 2 times while running this row"):
            bad.result(timeout=90)
    finally:
        sup.stop()
    assert labels == [int(v) for v in digits["label"][1:41]]
    assert 1 <= len(sup.exits) <= 3
    r = redis.Redis.from_url(poison_env["INFERQ_RESULT_BACKEND"])
    entries = read_dead_letters(r, poison_env["INFERQ_QUEUE_PREFIX"])
    assert [e["jobs"] for e in entries] == [[bad.id]]


def test_a_message_delivered_too_often_is_dead_lettered_whole(broker_env, start_worker,
                                                             digits):
    env = {**broker_env, "INFERQ_FAULT_INJECTION": f"exit_on={POISON}",
           "INFERQ_VISIBILITY_TIMEOUT": "3", "INFERQ_MAX_DELIVERIES": "2"}
    sup = Supervisor(start_worker, env)
    client = client_for(env)
    try:
        x = digits["x"][:20].copy()
        x[5, 0] = POISON
        result = client.submit_many("digits", x, chunk_rows=20).results(timeout=90)
    finally:
        sup.stop()
    assert sorted(result.errors) == list(range(20))
    assert "delivered 3 times (INFERQ_MAX_DELIVERIES=2)" in result.errors[0]
    assert sup.exits == [17, 17]
    r = redis.Redis.from_url(env["INFERQ_RESULT_BACKEND"])
    [entry] = read_dead_letters(r, env["INFERQ_QUEUE_PREFIX"])
    assert entry["deliveries"] == 3 and entry["task"] == "inferq.infer"
    listed = run_cli(["dead-letters", "--json", "--purge"], env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert json.loads(lines[0])["message_id"] == entry["message_id"]
    assert lines[1] == "purged 1 entries"
    assert read_dead_letters(r, env["INFERQ_QUEUE_PREFIX"]) == []
