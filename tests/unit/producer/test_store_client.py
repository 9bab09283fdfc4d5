"""Job records in the Redis result backend (fakeredis) read back as JobResults.

The Celery app is the real one from ``make_app``; only its Redis client is swapped for
fakeredis, so what is tested is Celery's key layout and our msgpack codec end to end.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from celery import Celery, states

from producer.client import Client, Job
from producer.coalesce import Item
from producer.store import ResultStore
from shared import codec
from shared.celery_app import make_app
from shared.errors import InputError, JobFailed, JobNotFound, ModelNotFound
from shared.results import to_result
from shared.schemas import JobStatus, Manifest, RowError, TensorSpec
from shared.settings import Settings, load_settings

# A test that reached for a real service would hang in retries: fail it instead.
pytestmark = pytest.mark.timeout(10)


def closed_port() -> int:
    """A local port nothing listens on (bound once by us, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_digits_manifest(root: Path) -> None:
    manifest = Manifest(
        name="digits", version=1,
        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name="probabilities", dtype="float32", shape=[-1, 10]),
                 TensorSpec(name="label", dtype="int64", shape=[-1])],
    )
    folder = root / "digits" / "1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(manifest.model_dump_json(indent=2))


def worker_result(**changes: Any) -> dict[str, Any]:
    """A result shaped like the one ``workers.tasks.infer`` returns for one row."""
    probs = np.zeros((1, 10), np.float32)
    probs[0, 3] = 0.75
    result = {
        "model": "digits", "version": 1, "rows": 1,
        "outputs": {"label": np.array([3], np.int64), "probabilities": probs},
        "ok": np.array([True]), "errors": [], "batch_rows": [4],
        "submitted_at": 100.0, "started_at": 100.5, "finished_at": 101.0,
        "worker": "w1",
    }
    result.update(changes)
    return result


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    write_digits_manifest(tmp_path / "models")
    return load_settings(broker_url="redis://127.0.0.1:6399/0", home=tmp_path / "home",
                         model_repo=tmp_path / "models")


@pytest.fixture
def fake() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())  # a fresh, private server


@pytest.fixture
def app(settings: Settings, fake: fakeredis.FakeRedis) -> Celery:
    app = make_app(settings)  # connects to nothing
    app.backend.__dict__["client"] = fake  # ``client`` is a cached property
    assert app.backend.client is fake
    return app


@pytest.fixture
def store(app: Celery) -> ResultStore:
    return ResultStore(app)


@pytest.fixture
def client(settings: Settings, app: Celery) -> Client:
    return Client(settings, app=app)


# -- the store -------------------------------------------------------------------------------
def test_records_land_in_the_fake_redis(store: ResultStore, fake: fakeredis.FakeRedis) -> None:
    assert fake.keys() == []
    store.mark_queued("job-1", {"model": "digits", "submitted_at": 1.0})
    assert fake.keys() == [b"celery-task-meta-job-1"]
    raw = fake.get(b"celery-task-meta-job-1")
    assert codec.loads(raw)["result"] == {"model": "digits", "submitted_at": 1.0}


def test_mark_queued_reads_back_queued_with_its_model(store: ResultStore, client: Client
                                                      ) -> None:
    store.mark_queued("job-1", {"model": "digits", "submitted_at": 12.5})
    assert store.fetch("job-1")["status"] == states.PENDING
    res = client.get("job-1")
    assert res.job_id == "job-1"
    assert res.status is JobStatus.queued
    assert res.model == "digits"
    assert res.submitted_at == 12.5
    assert res.outputs is None and res.errors == [] and res.error is None
    assert not res.done


def test_a_job_whose_every_row_failed_is_failed_and_keeps_its_outputs(
        app: Celery, client: Client, fake: fakeredis.FakeRedis) -> None:
    """The worker stores it as a task success; the SDK reads it ``failed``, as the API
    does (one rule: producer.store.every_row_failed), with its outputs and row errors."""
    errors = [{"index": 0, "row": 0, "field": None, "message": "row 0: model said no"}]
    app.backend.store_result("job-2", worker_result(errors=errors, ok=np.array([False])),
                             states.SUCCESS)
    # The stored bytes are the msgpack tensor codec, not JSON or pickle.
    stored = codec.loads(fake.get(b"celery-task-meta-job-2"))
    assert isinstance(stored["result"]["outputs"]["label"], np.ndarray)

    res = client.get("job-2")
    assert res.status is JobStatus.failed and res.done
    assert res.error == "row 0: model said no"
    assert res.model == "digits" and res.version == 1
    assert res.outputs is not None and set(res.outputs) == {"label", "probabilities"}
    label, probs = res.outputs["label"], res.outputs["probabilities"]
    assert isinstance(label, np.ndarray) and label.dtype == np.int64
    np.testing.assert_array_equal(label, [3])
    assert probs.dtype == np.float32 and probs.shape == (1, 10)
    assert probs[0, 3] == np.float32(0.75)
    assert res.errors == [RowError(row=0, field=None, message="row 0: model said no")]
    assert res.batch_rows == [4]
    assert res.submitted_at == 100.0 and res.finished_at == 101.0


def test_a_job_with_some_rows_failed_succeeded_with_its_row_errors(
        app: Celery, client: Client) -> None:
    errors = [{"index": 1, "row": 1, "field": None, "message": "row 1: model said no"}]
    app.backend.store_result("job-5", worker_result(
        rows=2, errors=errors, ok=np.array([True, False]),
        outputs={"label": np.array([3, 0], np.int64)}), states.SUCCESS)
    res = client.get("job-5")
    assert res.status is JobStatus.succeeded and res.error is None
    assert res.errors == [RowError(row=1, field=None, message="row 1: model said no")]


def test_started_reads_as_running_without_outputs(app: Celery, client: Client) -> None:
    app.backend.store_result("job-3", {"model": "digits", "outputs": {"label": [1]}},
                             states.STARTED)
    res = client.get("job-3")
    assert res.status is JobStatus.running
    assert res.model == "digits"
    assert res.outputs is None  # only a final record's outputs are read
    assert not res.done


def test_failure_reads_as_failed_naming_the_error(app: Celery, client: Client) -> None:
    app.backend.mark_as_failure("job-4", ValueError("boom"))
    res = client.get("job-4")
    assert res.status is JobStatus.failed and res.done
    assert res.error is not None and "boom" in res.error and "ValueError" in res.error
    assert res.outputs is None


def test_to_result_of_a_failed_record_without_an_exception() -> None:
    res = to_result("job-5", {"status": states.FAILURE, "result": "worker lost"})
    assert res.status is JobStatus.failed
    assert res.error == "worker lost"


def test_unknown_id_raises_job_not_found_naming_it(store: ResultStore, client: Client) -> None:
    with pytest.raises(JobNotFound, match="no-such-job"):
        store.fetch("no-such-job")
    with pytest.raises(JobNotFound, match="no-such-job"):
        client.get("no-such-job")


def test_fetch_many_keeps_order_with_none_for_missing(app: Celery, store: ResultStore) -> None:
    assert store.fetch_many([]) == []
    store.mark_queued("a", {"model": "digits"})
    app.backend.store_result("b", worker_result(), states.SUCCESS)
    metas = store.fetch_many(["b", "missing", "a", "b"])
    assert [m and m["task_id"] for m in metas] == ["b", None, "a", "b"]
    assert [m and m["status"] for m in metas] == [states.SUCCESS, None, states.PENDING,
                                                   states.SUCCESS]


# -- waiting ---------------------------------------------------------------------------------
def finish_later(app: Celery, job_id: str, delay: float = 0.05) -> threading.Timer:
    timer = threading.Timer(
        delay, app.backend.store_result, (job_id, worker_result(), states.SUCCESS))
    timer.start()
    return timer


@pytest.mark.parametrize("queued_first", [True, False], ids=["queued", "no-record-yet"])
def test_wait_returns_once_another_thread_writes_the_result(
        app: Celery, store: ResultStore, queued_first: bool) -> None:
    if queued_first:
        store.mark_queued("job-6", {"model": "digits"})
    timer = finish_later(app, "job-6")
    try:
        meta = store.wait("job-6", timeout=5)
    finally:
        timer.cancel()
        timer.join(timeout=5)
    assert meta["status"] == states.SUCCESS
    np.testing.assert_array_equal(meta["result"]["outputs"]["label"], [3])


def test_client_wait_and_job_result_read_the_outputs(app: Celery, client: Client) -> None:
    client.store.mark_queued("job-7", {"model": "digits"})
    job = Job(client, "job-7", "digits")
    assert job.status() is JobStatus.queued
    timer = finish_later(app, "job-7")
    try:
        outputs = job.result(timeout=5)
    finally:
        timer.cancel()
        timer.join(timeout=5)
    np.testing.assert_array_equal(outputs["label"], [3])
    assert client.wait("job-7", timeout=1).status is JobStatus.succeeded


def test_job_result_raises_job_failed_for_row_errors_and_failures(app: Celery,
                                                                   client: Client) -> None:
    errors = [{"index": 0, "row": 0, "field": None, "message": "row 0: bad pixels"}]
    app.backend.store_result("rows", worker_result(errors=errors), states.SUCCESS)
    with pytest.raises(JobFailed, match="bad pixels"):
        Job(client, "rows", "digits").result(timeout=1)
    app.backend.mark_as_failure("whole", ValueError("boom"))
    with pytest.raises(JobFailed, match="boom"):
        Job(client, "whole", "digits").result(timeout=1)


@pytest.mark.parametrize(("state", "status"), [(states.PENDING, "queued"),
                                               (states.STARTED, "running")])
def test_wait_times_out_naming_the_status(app: Celery, store: ResultStore, state: str,
                                          status: str) -> None:
    app.backend.store_result("job-8", {"model": "digits"}, state)
    with pytest.raises(TimeoutError, match=f"job-8 .*status {status}"):
        store.wait("job-8", timeout=0.1)


def test_wait_on_an_id_that_never_appears_raises_job_not_found(store: ResultStore) -> None:
    with pytest.raises(JobNotFound, match="ghost-job"):
        store.wait("ghost-job", timeout=0.2)


# -- submit validation: refused before any network use --------------------------------------
@pytest.fixture
def offline_client(tmp_path: Path) -> Client:
    """A Client whose broker and result store are a closed port: any I/O would fail."""
    write_digits_manifest(tmp_path / "models")
    url = f"redis://127.0.0.1:{closed_port()}/0"
    return Client(load_settings(broker_url=url, result_backend=url, home=tmp_path / "home",
                                model_repo=tmp_path / "models"))


@pytest.mark.parametrize("row", [list(range(63)), np.zeros(65, np.float32),
                                 np.zeros((3, 10), np.float32), np.zeros((2, 32), np.float32)],
                         ids=["63-values", "65-values", "rows-of-10", "2x32-is-not-a-row"])
def test_submit_refuses_a_wrong_row_shape(offline_client: Client, row: Any) -> None:
    with pytest.raises(InputError, match=r"\(1, 8, 8\)") as info:
        offline_client.submit("digits", row)
    assert info.value.field == "image"


def test_submit_refuses_an_unknown_input_name(offline_client: Client) -> None:
    with pytest.raises(InputError, match="unknown input") as info:
        offline_client.submit("digits", {"img": np.zeros(64, np.float32)})
    assert "'img'" in str(info.value) and "'image'" in str(info.value)


def test_submit_refuses_a_non_finite_row_among_several(offline_client: Client) -> None:
    rows = np.zeros((3, 64), np.float32)
    rows[1, 5] = np.nan
    with pytest.raises(InputError, match="row 1.*NaN") as info:
        offline_client.submit("digits", rows)
    assert info.value.row == 1


def test_submit_refuses_a_single_non_finite_row(offline_client: Client) -> None:
    with pytest.raises(InputError, match="row 0, field 'image': contains NaN"):
        offline_client.submit("digits", [float("nan")] * 64)


def test_submit_takes_an_8x8_image_for_a_1x8x8_input(offline_client: Client) -> None:
    from producer.publish import coerce_inputs

    manifest = offline_client.model("digits")[0].manifest
    assert coerce_inputs(manifest, np.ones((8, 8)))["image"].shape == (1, 1, 8, 8)


def test_submit_refuses_an_unknown_model(offline_client: Client) -> None:
    with pytest.raises(ModelNotFound, match="'faces'"):
        offline_client.submit("faces", np.zeros(64, np.float32))


def test_many_threads_wait_on_one_listener_and_each_gets_its_own_result(
        app: Celery, store: ResultStore) -> None:
    ids = [f"job-w{i}" for i in range(20)]
    got: dict[str, Any] = {}

    def wait(job_id: str) -> None:
        got[job_id] = store.wait(job_id, timeout=8)

    threads = [threading.Thread(target=wait, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for i, job_id in enumerate(reversed(ids)):  # stored in another order than waited
        app.backend.store_result(job_id, worker_result(rows=i), states.SUCCESS)
    for t in threads:
        t.join(10)
    assert {j: m["result"]["rows"] for j, m in got.items()} == {
        j: len(ids) - 1 - i for i, j in enumerate(ids)}
    waiter = store._waiter
    assert waiter is not None and waiter._waiters == {}  # every subscription released


def test_messages_show_a_summary_not_the_rows(app: Celery, client: Client,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower and Celery's events show ``kwargsrepr``: the model and a count, never the
    inputs (Celery would saferepr them, ~0.5 ms of CPU per message)."""
    from producer import direct
    from shared.repository import ModelRef

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(direct, "usable", lambda app: False)  # send_task's path, faked
    monkeypatch.setattr(app, "send_task", lambda *a, **kw: sent.append(kw))
    rows = np.full((3, 64), 0.123456, np.float32)
    client.publish(ModelRef("digits", "int8"), "job-1", {"image": rows})
    assert sent[0]["kwargsrepr"] == "{'model': 'digits:int8', 'rows': 3}"
    assert sent[0]["argsrepr"] == "()" and "0.123" not in str(sent[0]["kwargsrepr"])
    client.coalescer.mark = False
    client.coalescer.send(ModelRef("digits"), "normal", [
        Item("a", {"image": rows[:1]}, 1.0), Item("b", {"image": rows[1:2]}, 1.0)])
    assert sent[1]["kwargsrepr"] == "{'model': 'digits', 'jobs': 2, 'ids': ['a', 'b']}"
    many = [Item(f"j{i}", {"image": rows[:1]}, 1.0) for i in range(10)]
    client.coalescer.send(ModelRef("digits"), "normal", many)
    assert sent[2]["kwargsrepr"].endswith("'j6', 'j7', ...]}")  # the first 8 ids
