"""Celery's own tools against a real inferq worker: `celery inspect`, Flower, a plain client.

Nothing here imports inferq on the tools' side except ``-A shared.celery_main``, which is
the documented way to point Celery's CLI at inferq's settings; the plain forms get only
the broker URL, as a Flower container or an operator's shell would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, client_for, free_port, stop_process, wait_until

pytestmark = pytest.mark.integration


def celery(env: dict[str, str], *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", *args],
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_celery_inspect_lists_the_worker_its_queues_and_stats(broker_env, start_worker) -> None:
    worker = start_worker(broker_env)
    name = f"inferq.{worker.pid}@"
    node = name + socket.gethostname()  # addressed: the answer ends the wait, not --timeout
    queue = broker_env["INFERQ_QUEUE_PREFIX"] + "infer.digits"
    for command, expected in (("ping", "pong"), ("stats", '"prefetch_count"'),
                              ("active_queues", queue), ("active", name),
                              ("registered", "inferq.infer_many")):
        done = celery(broker_env, "-A", "shared.celery_main", "inspect", command,
                      "--timeout", "10", "--destination", node, "--json")
        assert done.returncode == 0, f"inspect {command}: {done.stdout}{done.stderr}"
        assert name in done.stdout and expected in done.stdout, (command, done.stdout)
    # A bare `celery -b URL`, as from a shell with no inferq installed.
    done = celery(broker_env, "-b", broker_env["INFERQ_BROKER_URL"], "inspect", "ping",
                  "--timeout", "10", "--destination", node)
    assert done.returncode == 0 and name in done.stdout, done.stdout + done.stderr


def test_flower_lists_the_worker_and_its_tasks(redis_env, start_worker, tmp_path: Path
                                               ) -> None:
    worker = start_worker(redis_env)
    name = f"inferq.{worker.pid}@"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "flower.log"
    with log.open("ab") as handle:
        # The compose file's command: a plain Celery with the broker URL only.
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-b", redis_env["INFERQ_BROKER_URL"], "flower",
             f"--port={port}", "--address=127.0.0.1"],
            env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}, stdout=handle,
            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def get(path: str) -> httpx.Response | None:
            try:
                return httpx.get(url + path, timeout=10)
            except httpx.HTTPError:
                assert flower.poll() is None, log.read_text()[-3000:]
                return None

        wait_until(lambda: get("/healthcheck"), 60, "flower up", pause=0.2)
        workers = wait_until(
            lambda: (r := get("/api/workers?refresh=1")) is not None and name in r.text
            and r.json(), 60, "flower lists the worker", pause=0.5)
        [info] = [v for k, v in workers.items() if k.startswith(name)]
        assert any(q["name"].endswith("infer.digits") for q in info["active_queues"])

        # Flower switches the worker's task events on; then jobs show up as tasks.
        client = client_for(redis_env)
        rows = np.zeros((1, 64), dtype=np.float32)

        def tasks_seen() -> dict | None:
            client.submit("digits", rows).result(timeout=30)
            r = get("/api/tasks")
            # A task whose events began before Flower switched them on has no name (its
            # task-received event was never sent): the next one has.
            done = {k: v for k, v in (r.json() if r is not None else {}).items()
                    if (v.get("name") or "").startswith("inferq.")
                    and v["state"] == "SUCCESS"}
            return done or None

        tasks = wait_until(tasks_seen, 60, "flower shows a finished task", pause=0.5)
        assert all(v["worker"].startswith(name) for v in tasks.values()), tasks
    finally:
        stop_process(flower)


def test_a_plain_celery_client_sends_a_job_and_reads_its_result(redis_env, start_worker,
                                                                 digits) -> None:
    """With INFERQ_RESULT_SERIALIZER=json, a Celery app that knows nothing of inferq (JSON
    both ways) sends ``inferq.infer`` and reads the stored record."""
    from celery import Celery

    env = {**redis_env, "INFERQ_RESULT_SERIALIZER": "json"}
    start_worker(env)
    app = Celery("plain", broker=env["INFERQ_BROKER_URL"], backend=env["INFERQ_RESULT_BACKEND"],
                 set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"])
    rows = digits["x"][:3]
    sent = app.send_task("inferq.infer", args=["digits", {"image": rows.tolist()}],
                         queue=env["INFERQ_QUEUE_PREFIX"] + "infer.digits")
    try:
        # An embedded worker started earlier in this process (other tests) marks it as a
        # worker, where Celery refuses a blocking get() unless told this is no subtask.
        record = sent.get(timeout=60, disable_sync_subtasks=False)
    finally:
        app.close()
    assert record["outputs"]["label"] == digits["label"][:3].tolist()
    np.testing.assert_allclose(record["outputs"]["probabilities"], digits["probabilities"][:3],
                               rtol=1e-5)
    assert record["errors"] in ({}, [])
    # inferq's own SDK reads the same JSON record.
    assert client_for(redis_env).get(sent.id).status == "succeeded"
