"""``inferq top --once`` against a real Redis broker and a real worker."""

from __future__ import annotations

import re

import pytest

from tests.conftest import client_for, run_cli

pytestmark = pytest.mark.integration


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]


def test_top_once_shows_the_queue_the_worker_and_its_rows(redis_env, start_worker) -> None:
    worker = start_worker(redis_env)
    client = client_for(redis_env)
    from workers.build.digits import load_digits_data

    images, _ = load_digits_data()
    jobs = [client.submit("digits", {"image": images[i:i + 4]}) for i in range(0, 80, 4)]
    for job in jobs:
        job.result(timeout=60)

    done = run_cli(["top", "--once"], redis_env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    queue = redis_env["INFERQ_QUEUE_PREFIX"] + "infer.digits"
    [digits] = [cells(line) for line in out.splitlines() if queue in line]
    assert digits[:4] == ["digits", queue, "0", "0"], out  # nothing left waiting
    assert digits[4] == "1", out  # one worker serves digits
    name = f"inferq.{worker.pid}@"
    [row] = [cells(line) for line in out.splitlines() if name in line]
    assert row[1] == "digits@1", out
    assert int(row[3].replace(",", "")) >= 80, out  # the rows its model calls took
    assert "workers: 1 alive" in out and "dead letters: 0" in out
    assert "error:" not in out


def test_top_json_once_has_every_figure_unformatted(redis_env, start_worker) -> None:
    import json

    worker = start_worker(redis_env)
    client_for(redis_env).submit("digits", [0.0] * 64).result(timeout=60)
    done = run_cli(["top", "--once", "--json"], redis_env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(done.stdout)
    [digits] = [m for m in record["models"] if m["model"] == "digits"]
    assert digits["waiting"] == {"normal": 0, "high": 0} and digits["workers"] == 1
    [version] = [v for v in record["versions"] if v["worker"].startswith(f"inferq.{worker.pid}@")]
    assert version["model"] == "digits@1" and version["rows"] >= 1
    assert record["errors"] == []
