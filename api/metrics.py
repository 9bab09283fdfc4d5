"""Prometheus metrics of the API process (its own registry, so tests can build many apps)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 300)


class _Depths(Collector):
    """``inferq_queue_depth`` read at scrape time (cached for a second by QueueDepth)."""

    def __init__(self, read: Callable[[], dict[str, int]]):
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("inferq_queue_depth", "Messages waiting in a model's queue",
                                   labels=["model"])
        try:
            for model, depth in sorted(self.read().items()):
                family.add_metric([model], depth)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail on a broker outage
            logger.warning("queue depth unavailable for /metrics: %s", type(exc).__name__)
        yield family


class ApiMetrics:
    def __init__(self, depths: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("inferq_api_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram("inferq_api_request_duration_seconds",
                                         "HTTP request handling time", ["method", "route"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.jobs = Counter("inferq_jobs", "Jobs submitted through the API, by final state",
                            ["model", "state"], registry=self.registry)
        self.latency = Histogram("inferq_job_latency_seconds",
                                 "Submitted until finished, jobs submitted through the API",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.callbacks = Counter("inferq_callbacks", "Callback deliveries by outcome",
                                 ["outcome"], registry=self.registry)
        self.depths = _Depths(depths)
        self.registry.register(self.depths)

    def scraped(self) -> CollectorRegistry:
        """What /metrics shows: this process's registry, or with ``inferq api --workers N``
        (PROMETHEUS_MULTIPROC_DIR set) every process's counts added up."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.depths)
        return registry

    def finished(self, model: str, state: str, seconds: float | None) -> None:
        self.jobs.labels(model, state).inc()
        if seconds is not None and seconds >= 0:
            self.latency.labels(model).observe(seconds)
