"""Drift through a real worker: in-distribution digits stay under the threshold, brighter
ones cross it, in `inferq drift` and in the worker's `inferq_input_drift` gauge."""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest

from tests.conftest import client_for, free_port, run_cli
from workers.build.digits import split
from workers.drift import DRIFT_THRESHOLD, WATCH_THRESHOLD

pytestmark = pytest.mark.integration


def gauge(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    found = re.search(rb'^inferq_input_drift\{model="digits",version="1"\} (\S+)$', text,
                      re.MULTILINE)
    assert found, text[-2000:]
    return float(found.group(1))


def drift_report(env: dict[str, str]) -> dict:
    proc = run_cli(["drift", "digits", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["digits@1"]  # type: ignore[no-any-return]


def test_drift_is_reported_when_inputs_change(redis_env, start_worker):
    port = free_port()
    env = {**redis_env, "INFERQ_METRICS_PORT": str(port)}
    start_worker(env)
    client = client_for(env)
    _, x_test, _, _ = split(0)
    assert np.isnan(gauge(port))  # nothing seen yet
    client.submit_many("digits", x_test, chunk_rows=16).results(60)  # all rows observed
    calm = drift_report(env)
    assert calm["verdict"] == "ok" and calm["score"] < WATCH_THRESHOLD, calm
    assert gauge(port) < WATCH_THRESHOLD
    brighter = np.clip(np.tile(x_test, (6, 1, 1, 1)) + 4, 0, 16).astype(np.float32)
    client.submit_many("digits", brighter, chunk_rows=32).results(60)
    shifted = drift_report(env)
    print(f"\nPSI held-out {calm['score']:.3f} ({calm['rows']} rows), after brighter inputs "
          f"{shifted['score']:.3f}; most shifted: {shifted['features'][:3]}")
    assert shifted["verdict"] == "drift" and shifted["score"] > DRIFT_THRESHOLD
    assert gauge(port) > DRIFT_THRESHOLD
    table = run_cli(["drift", "digits"], env)
    assert "drift" in table.stdout and "digits@1" in table.stdout
