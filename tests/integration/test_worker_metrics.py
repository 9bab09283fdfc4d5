"""A worker process serves Prometheus metrics: model calls, rows per call, jobs by state,
queue wait, the models it serves; read from the real port after real jobs."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import client_for, free_port

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_worker_metrics_count_what_ran(redis_env, start_worker, digits) -> None:
    port = free_port()
    start_worker({**redis_env, "INFERQ_METRICS_PORT": str(port)})
    client = client_for(redis_env)
    jobs = [client.submit("digits", digits["x"][i]) for i in range(30)]
    for job in jobs:
        job.result(timeout=30)
    client.submit_many("digits", digits["x"][:2000], chunk_rows=1024).results(timeout=60)
    m = scrape(port)
    device = (("device", "cpu"),)
    calls = ("model", "digits"), ("variant", "fp32")
    assert m[("inferq_jobs_total", (("model", "digits"), ("state", "succeeded")))] == 32
    assert m[("inferq_batch_rows_sum", (*device, *calls))] == 2030  # every row, once
    assert m[("inferq_inference_seconds_count", (*device, *calls))] == \
        m[("inferq_batch_rows_count", (*device, *calls))] >= 1
    assert m[("inferq_queue_wait_seconds_count", (("model", "digits"),))] == 32
    assert m[("inferq_model_loaded", (*device, ("model", "digits"), ("variant", "fp32"),
                                      ("version", "1")))] == 1
