"""``producer.http.HttpClient`` against a real ``inferq api`` process and a real worker."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from producer.http import HttpBatch, HttpClient
from shared.errors import (
    AuthError,
    InputError,
    InvalidModelName,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ModelNotFound,
)
from shared.schemas import JobStatus
from tests.conftest import client_for

pytestmark = pytest.mark.integration


@pytest.fixture
def api_env(redis_env: dict[str, str]) -> dict[str, str]:
    return {**redis_env, "INFERQ_API_KEYS": "acme:key-a,beta:key-b",
            "INFERQ_CALLBACK_SECRET": "x"}


@pytest.fixture
def http(api_env, start_api):  # noqa: ANN001, ANN201 - fixtures
    api = start_api(api_env)
    with HttpClient(api.url, "key-a") as client:
        yield client


def assert_rows_match(outputs: dict[str, np.ndarray], digits: dict[str, np.ndarray],
                      rows: Any) -> None:
    assert outputs["label"].dtype == np.int64
    assert outputs["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(outputs["label"], digits["label"][rows])
    np.testing.assert_allclose(outputs["probabilities"], digits["probabilities"][rows],
                               rtol=1e-5, atol=1e-6)


def test_submit_result_equal_in_process_outputs(api_env, http, start_worker, digits):
    start_worker(api_env)
    x = digits["x"]
    jobs = [http.submit("digits", x[i]) for i in range(5)]
    for i, job in enumerate(jobs):
        assert_rows_match(job.result(timeout=30), digits, [i])
        assert job.status() is JobStatus.succeeded

    few = http.submit("digits", x[10:13], wait="10s")  # long poll: comes back finished
    res = http.get(few.id)
    assert res.status is JobStatus.succeeded and res.model == "digits"
    assert res.version == 1 and res.started_at and res.finished_at
    assert_rows_match(res.outputs or {}, digits, slice(10, 13))
    assert_rows_match(few.result(timeout=0), digits, slice(10, 13))
    assert http.wait(jobs[0].id, timeout=5).status is JobStatus.succeeded
    assert http.cancel(jobs[0].id) is False  # it already ran

    info = http.model("digits")
    assert [s.name for s in info.outputs] == ["probabilities", "label"]
    assert [m.name for m in http.models()] == ["digits"]


def test_submit_many_5000_rows_with_bad_rows(api_env, http, start_worker, digits):
    start_worker(api_env)
    x = digits["x"][:5000]
    rows: list[Any] = list(x)
    bad = {7: [1.0] * 63, 1234: "not numbers", 4321: np.full(64, np.nan, np.float32)}
    for row, value in bad.items():
        rows[row] = value
    rows[4999] = {"image": x[4999]}  # the {input name: value} form of a row
    batch = http.submit_many("digits", rows)
    assert batch.last_progress is not None and batch.last_progress.total == 5000

    result = batch.results(timeout=60)
    assert len(result) == 5000
    assert set(result.errors) == set(bad)
    for row, message in result.errors.items():
        assert f"row {row}" in message and "image" in message, message
    good = np.setdiff1d(np.arange(5000), list(bad))
    assert result.ok[good].all() and not result.ok[list(bad)].any()
    assert_rows_match({k: v[good] for k, v in result.outputs.items()}, digits, good)
    assert (result.outputs["label"][list(bad)] == 0).all()

    progress = batch.progress()
    assert (progress.status, progress.total, progress.done, progress.failed) == \
        ("completed", 5000, 5000, 3)
    tail = list(batch.iter_rows(offset=4320))
    assert [r.row for r in tail] == list(range(4320, 5000))
    assert not tail[1].ok and "NaN" in (tail[1].error or "")
    assert tail[0].ok and tail[0].outputs is not None
    assert tail[0].outputs["label"].dtype == np.int64
    assert int(tail[0].outputs["label"]) == digits["label"][4320]


def test_cancel_jobs_and_batches_no_worker_has_run(api_env, http, digits):
    job = http.submit("digits", digits["x"][0])  # no worker yet: it stays queued
    assert job.status() is JobStatus.queued
    assert http.cancel(job.id) is True
    assert http.get(job.id).status is JobStatus.cancelled
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    assert http.cancel(job.id) is True  # cancelled before: still cancelled
    with pytest.raises(JobNotFound):
        http.cancel("0" * 32)

    batch = http.submit_many("digits", digits["x"][:3000])
    progress = batch.cancel()
    assert (progress.status, progress.cancelled) == ("cancelled", 3000)
    result = batch.results(timeout=10)
    assert not result.ok.any() and len(result.errors) == 3000
    assert "cancelled" in result.errors[2999]


def test_errors_are_mapped_to_the_sdk_exceptions(http, digits):
    row = digits["x"][0].reshape(-1)
    with pytest.raises(InputError) as info:
        http.submit("digits", np.stack([row, np.full(64, np.nan, np.float32)]))
    assert (info.value.row, info.value.field) == (1, "image")
    assert "row 1" in str(info.value)
    with pytest.raises(InputError) as info:
        http.submit("digits", row[:63])
    assert info.value.field == "image" and "64 values" in str(info.value)
    with pytest.raises(ModelNotFound):
        http.submit("no-such-model", row)
    with pytest.raises(ModelNotFound):
        http.model("no-such-model")
    with pytest.raises(InvalidModelName):
        http.submit("Digits!", row)

    with HttpClient(http.base_url, "not-a-key") as stranger, pytest.raises(AuthError):
        stranger.models()

    job = http.submit("digits", row)
    batch = http.submit_many("digits", digits["x"][:10])
    with HttpClient(http.base_url, "key-b") as beta:  # another tenant
        with pytest.raises(JobNotFound):
            beta.get(job.id)
        with pytest.raises(JobNotFound):
            beta.cancel(job.id)
        with pytest.raises(JobNotFound):
            beta.batch(batch.id)
        with pytest.raises(JobNotFound):
            next(HttpBatch(beta, batch.id, "digits").iter_rows())
        assert beta.models()[0].name == "digits"  # what is not tenant-owned is shared
    assert http.get(job.id).status is JobStatus.queued  # still there for its owner


# -- the same user code over either client --------------------------------------------------
def score(client: Any, rows: np.ndarray) -> dict[str, Any]:
    """What a web backend might do; works with Client and HttpClient alike."""
    job = client.submit("digits", rows[0])
    first = job.result(timeout=30)
    assert client.get(job.id).status is JobStatus.succeeded
    assert client.wait(job.id, 5).done
    assert client.cancel(job.id) is False
    try:
        client.submit("digits", rows[:2] * np.nan).result(timeout=30)
    except InputError as exc:  # refused on submit: Client checks locally, HTTP gets 422
        refused = exc.row
    except JobFailed:
        refused = -1
    result = client.submit_many("digits", rows).results(timeout=60)
    return {"first": first, "refused": refused, "outputs": result.outputs, "ok": result.ok,
            "errors": result.errors}


def test_the_same_code_runs_on_client_and_http_client(api_env, http, start_worker, digits):
    start_worker(api_env)
    rows = digits["x"][:2500].copy()
    rows[1500] = np.inf
    direct = score(client_for(api_env), rows)
    over_http = score(http, rows)
    for got in (direct, over_http):
        assert_rows_match(got["first"], digits, [0])
        assert got["refused"] == 0
        assert set(got["errors"]) == {1500}
        assert got["ok"].sum() == 2499
        good = np.flatnonzero(got["ok"])
        assert_rows_match({k: v[good] for k, v in got["outputs"].items()}, digits, good)
    assert direct["errors"] == over_http["errors"]
    for name in ("label", "probabilities"):
        assert direct["outputs"][name].dtype == over_http["outputs"][name].dtype
        np.testing.assert_array_equal(direct["outputs"][name], over_http["outputs"][name])
