"""The embedded result store never shows a reader half a result."""

from __future__ import annotations

import threading

import numpy as np

from shared import codec
from shared.celery_app import make_app
from shared.filestore import AtomicFilesystemBackend
from shared.settings import load_settings


def test_embedded_app_uses_the_atomic_file_store(tmp_path):
    app = make_app(load_settings(home=tmp_path, broker_url=None, result_backend=None))
    assert isinstance(app.backend, AtomicFilesystemBackend)
    app.backend.store_result("job-1", {"x": np.arange(3)}, "SUCCESS")
    meta = app.backend.get_task_meta("job-1")
    assert meta["status"] == "SUCCESS"
    np.testing.assert_array_equal(meta["result"]["x"], np.arange(3))
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".tmp-")]


def test_a_polling_reader_sees_whole_results_only(tmp_path):
    app = make_app(load_settings(home=tmp_path, broker_url=None, result_backend=None))
    backend = app.backend
    key = backend.get_key_for_task("job-2")
    payloads = [codec.dumps({"x": np.full(50_000, i, np.float32)}) for i in range(2)]
    backend.set(key, payloads[0])
    stop = threading.Event()
    torn: list[int] = []

    def read() -> None:
        while not stop.is_set():
            value = backend.get(key)
            if value not in payloads:
                torn.append(len(value or b""))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        backend.set(key, payloads[i % 2])
    stop.set()
    reader.join(timeout=10)
    assert torn == []
