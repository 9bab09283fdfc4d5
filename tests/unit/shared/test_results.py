"""The job record (shared/results.py): what each writer stores is what every reader reads,
through Celery's own backend encoding."""

from __future__ import annotations

import numpy as np
from celery import states

from shared.claims import CANCELLED_STATE, EXPIRED_STATE
from shared.errors import InputError, JobCancelled
from shared.results import JobRecord, is_final, result_value, status_of, to_result
from shared.schemas import JobStatus
from shared.settings import load_settings


def _backend(monkeypatch):
    from shared.celery_app import make_app

    monkeypatch.setenv("INFERQ_BROKER_URL", "redis://127.0.0.1:1/0")  # never connected
    return make_app(load_settings()).backend


def test_a_queued_record_round_trips_through_celerys_backend(monkeypatch) -> None:
    backend = _backend(monkeypatch)
    raw = JobRecord.queued("j1", "digits", 12.5).encode(backend)
    meta = backend.decode_result(raw)
    assert meta["task_id"] == "j1" and status_of(meta) is JobStatus.queued
    assert not is_final(meta) and JobRecord.decode(meta).result == {"model": "digits",
                                                                   "submitted_at": 12.5}


def test_each_final_state_reads_back_as_the_sdk_sees_it(monkeypatch) -> None:
    backend = _backend(monkeypatch)
    done = {"model": "digits", "rows": 1, "outputs": {"label": np.array([3])},
            "errors": [], "ok": np.array([True]), "finished_at": 2.0}
    cases = {states.SUCCESS: (done, JobStatus.succeeded),
             states.FAILURE: (InputError("inputs: bad"), JobStatus.failed),
             CANCELLED_STATE: ({"model": "digits", "cancelled_at": 1.0}, JobStatus.cancelled),
             EXPIRED_STATE: ({"deadline": 1.0, "expired_at": 2.0}, JobStatus.expired)}
    for state, (value, want) in cases.items():
        meta = backend.decode_result(JobRecord("j", state, value, "now").encode(backend))
        assert is_final(meta) and to_result("j", meta).status is want, state
    cancelled = backend.decode_result(JobRecord("j", CANCELLED_STATE, {}).encode(backend))
    assert isinstance(result_value(cancelled), JobCancelled)
    failed = backend.decode_result(JobRecord("j", states.FAILURE, InputError("x")).encode(
        backend))
    assert "x" in (to_result("j", failed).error or "")


def test_a_job_whose_every_row_failed_reads_as_failed() -> None:
    value = {"model": "digits", "rows": 1, "outputs": {}, "ok": np.array([False]),
             "errors": [{"row": 0, "field": None, "message": "row 0: nan"}]}
    res = to_result("j", {"status": states.SUCCESS, "result": value})
    assert res.status is JobStatus.failed and res.error == "row 0: nan"
