"""``inferq api`` as several processes: everything a request needs is shared through
Redis, so any process can answer for a job another one took; ``--workers 2`` serves on
one port and ``/metrics`` adds every process's counts up."""

from __future__ import annotations

import re
import threading

import httpx
import numpy as np
import pytest

from tests.integration.test_api_e2e import AUTH, api_env

pytestmark = pytest.mark.integration


def _row(digits: dict, i: int) -> list[float]:
    return np.asarray(digits["x"][i]).reshape(-1).tolist()


def test_a_job_posted_on_one_process_is_awaited_and_cancelled_through_another(
        redis_env, start_worker, start_api, digits):
    env = api_env(redis_env, INFERQ_API_RATE_PER_S="0")
    one, two = start_api(env), start_api(env)
    with httpx.Client(base_url=one.url, headers=AUTH, timeout=30) as a, \
            httpx.Client(base_url=two.url, headers=AUTH, timeout=30) as b:
        queued = [a.post("/v1/models/digits/jobs", json={"inputs": _row(digits, i)}).json()
                  for i in range(3)]  # no worker yet: they wait in the queue
        cancelled = b.delete(f"/v1/jobs/{queued[0]['id']}")
        assert cancelled.json()["status"] == "cancelled", cancelled.text
        waited: dict[str, dict] = {}

        def wait_on_two(job_id: str) -> None:
            with httpx.Client(base_url=two.url, headers=AUTH, timeout=30) as c:
                waited[job_id] = c.get(f"/v1/jobs/{job_id}", params={"wait": "20s"}).json()

        waiters = [threading.Thread(target=wait_on_two, args=(j["id"],)) for j in queued[1:]]
        for t in waiters:
            t.start()
        start_worker(redis_env)
        for t in waiters:
            t.join(30)
        assert [waited[j["id"]]["status"] for j in queued[1:]] == ["succeeded"] * 2
        assert waited[queued[1]["id"]]["outputs"]["label"] == [int(digits["label"][1])]
        # A long poll posted with ?wait on one process, while the other answers for it.
        r = b.post("/v1/models/digits/jobs", params={"wait": "20s"},
                   json={"inputs": _row(digits, 4)})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        assert a.get(r.headers["location"]).json()["outputs"] == r.json()["outputs"]
        assert a.get(f"/v1/jobs/{queued[0]['id']}").json()["status"] == "cancelled"


def test_two_api_processes_on_one_port_and_metrics_added_up(redis_env, start_worker,
                                                             start_api, digits):
    start_worker(redis_env)
    api = start_api(api_env(redis_env, INFERQ_API_RATE_PER_S="0"), workers=2)
    for i in range(12):  # a connection each: the kernel hands them to either process
        with httpx.Client(base_url=api.url, headers=AUTH, timeout=30) as http:
            r = http.post("/v1/models/digits/jobs", params={"wait": "20s"},
                          json={"inputs": _row(digits, i)})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    pattern = re.compile(r'^inferq_api_requests_total\{method="POST",'
                         r'route="/v1/models/\{model\}/jobs",status="200"\} (\S+)$', re.M)
    seen = set()
    for _ in range(6):  # whichever process answers the scrape, it reports both
        with httpx.Client(base_url=api.url, timeout=30) as http:
            seen.add(float(pattern.search(http.get("/metrics").text).group(1)))
    assert seen == {12.0}
    log = api.log.read_text()
    assert len(set(re.findall(r"Started server process \[(\d+)\]", log))) == 2, log[-2000:]
