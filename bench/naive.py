"""The naive baseline: what a user writes by hand. One Celery task per row, JSON, no
batching; the model is loaded once per worker process and runs one row per task.

Started as ``celery -A bench.naive worker -P threads -c 4 --prefetch-multiplier 1``.
Only the bench uses it; it is not part of inferq. ``BENCH_NAIVE_MODEL`` is the model
version folder (``model.onnx`` and, for text, ``tokenizer.json``), ``BENCH_NAIVE_THREADS``
the ONNX Runtime threads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery

from bench.config import REDIS_URL

QUEUE = "bench.naive"

# ``celery -A`` needs the app at import; Celery connects lazily, so nothing is opened here.
app = Celery("bench.naive", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue=QUEUE, worker_hijack_root_logger=False)

_model: Any = None
_lock = threading.Lock()


class _Model:
    """One ONNX Runtime session (+ tokenizer for text), the manifest's session options."""

    def __init__(self, folder: Path, threads: int):
        import json

        import onnxruntime as ort

        from workers.runtimes.onnx import session_options

        manifest = json.loads((folder / "manifest.json").read_text())
        options, kwargs = session_options(threads, manifest.get("runtime_options"))
        self.session = ort.InferenceSession(str(folder / manifest["artifact"]), options,
                                            providers=["CPUExecutionProvider"], **kwargs)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = None
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.tokenizer.enable_truncation(manifest["preprocessing"]["max_length"])
            self.tokenizer.no_padding()
        self.row_shape = [max(d, 1) for d in manifest["inputs"][0]["shape"][1:]]

    def feed(self, row: Any) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            return {self.inputs[0]: np.asarray(row, np.float32).reshape(1, *self.row_shape)}
        e = self.tokenizer.encode(row)
        feed = {"input_ids": np.array([e.ids], np.int64),
                "attention_mask": np.array([e.attention_mask], np.int64),
                "token_type_ids": np.array([e.type_ids], np.int64)}
        return {k: v for k, v in feed.items() if k in self.inputs}

    def __call__(self, row: Any) -> list[Any]:
        return [v.tolist() for v in self.session.run(None, self.feed(row))]


def model() -> _Model:
    global _model
    with _lock:
        if _model is None:
            _model = _Model(Path(os.environ["BENCH_NAIVE_MODEL"]),
                            int(os.environ.get("BENCH_NAIVE_THREADS", "1")))
        return _model


@app.task(name="bench.naive.infer")
def infer(row: Any) -> list[Any]:
    return model()(row)
