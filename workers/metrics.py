"""Prometheus metrics of one worker process, served on ``INFERQ_METRICS_PORT`` (0: off).

One worker process per GPU (or per host) means one scrape target per process: with
``--scale worker=N`` each container serves its own port, no multiprocess collector needed.
Names and units follow Prometheus conventions (``_seconds``, ``_total``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from shared.schemas import Manifest

logger = logging.getLogger(__name__)

ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                   5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self, device: str) -> None:
        self.device = device
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_rows = Histogram("inferq_batch_rows", "Rows in each model call",
                                    ["model", "variant", "device"], buckets=ROWS_BUCKETS,
                                    registry=r)
        self.inference = Histogram("inferq_inference_seconds", "Time of each model call",
                                   ["model", "variant", "device"], buckets=SECONDS_BUCKETS,
                                   registry=r)
        self.queue_wait = Histogram("inferq_queue_wait_seconds",
                                    "Submitted until a worker started the job", ["model"],
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.jobs = Counter("inferq_jobs", "Jobs this worker ended, by final state",
                            ["model", "state"], registry=r)
        self.retries = Counter("inferq_retries", "Messages delivered again to this worker "
                               "(their first worker died or stopped before acking)",
                               ["model"], registry=r)
        self.dead_letters = Counter("inferq_dead_letters", "Jobs or rows dead-lettered: "
                                    "not run again after killing their worker",
                                    ["model"], registry=r)
        self.drift_score = Gauge("inferq_input_drift", "Population Stability Index of recent "
                                 "inputs vs the model's reference data (over 0.25: drift)",
                                 ["model", "version"], registry=r)
        self.loaded = Gauge("inferq_model_loaded", "1 for each model version this worker "
                            "serves", ["model", "version", "variant", "device"], registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
        logger.info("worker metrics on :%d/metrics", port)

    def model_loaded(self, manifest: Manifest) -> None:
        self.loaded.labels(manifest.name, str(manifest.version), manifest.variant,
                           self.device).set(1)

    def batch(self, manifest: Manifest, rows: int, seconds: float) -> None:
        labels = (manifest.name, manifest.variant, self.device)
        self.batch_rows.labels(*labels).observe(rows)
        self.inference.labels(*labels).observe(seconds)

    def watch_drift(self, manifest: Manifest, score: Callable[[], float | None]) -> None:
        """The drift gauge of a model version reads ``score()`` at each scrape (NaN until
        enough rows were seen)."""
        def read() -> float:
            value = score()
            return math.nan if value is None else value

        self.drift_score.labels(manifest.name, str(manifest.version)).set_function(read)

    def redelivered(self, model: str) -> None:
        self.retries.labels(model).inc()

    def dead_lettered(self, model: str) -> None:
        self.dead_letters.labels(model).inc()

    def job(self, model: str, state: str, submitted_at: float | None, started: float) -> None:
        self.jobs.labels(model, state).inc()
        if submitted_at is not None and started >= submitted_at:
            self.queue_wait.labels(model).observe(started - submitted_at)
