"""``inferq demo``: the bundled digits model scored through the queue, end to end."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from producer.files.writers import open_writer
from shared.repository import ModelVersion
from shared.settings import Settings, scrub


def run_demo(settings: Settings, client: AbstractContextManager[Any], version: ModelVersion,
             images: np.ndarray, labels: np.ndarray) -> str:
    """Score ``images`` through the queue with ``client``; report accuracy and speed."""
    with client as c:
        started = time.perf_counter()
        result = c.submit_many(version.manifest.name, images).results(timeout=120)
        seconds = time.perf_counter() - started
    accuracy = float(np.mean(result.outputs["label"] == labels))
    out_dir = settings.home / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "digits-predictions.parquet"
    writer = open_writer(path, version.manifest.outputs)
    writer.write(0, result.outputs, result.ok, result.errors)
    writer.close()
    mode = ("embedded: in-memory broker, in-process worker" if settings.embedded
            else f"broker {scrub(settings.broker_url or '')}")
    return (f"scored {len(result):,} digits with {version.key} ({mode})\n"
            f"accuracy {accuracy:.4f}   {len(result) / seconds:,.0f} rows/s "
            f"({seconds:.2f} s)   {len(result.errors)} errors\n"
            f"predictions:  {path.resolve()}\n"
            f"result store: {scrub(settings.effective_result_backend())}")
