"""The models a worker process serves: one runtime and one batcher per model version."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from shared.catalog import Publisher
from shared.repository import CachedResolver, ModelRef, ModelVersion, open_repository
from shared.settings import Settings
from workers import faults
from workers.batcher import Batcher
from workers.device_errors import is_device_lost
from workers.drift import DriftMonitor
from workers.metrics import WorkerMetrics
from workers.runtimes import Runtime, load_runtime

logger = logging.getLogger(__name__)

LATEST_TTL = 5.0  # seconds a "latest version" lookup is reused


@dataclass
class BatchStats:
    """The worker's own record of model calls (rows per call), for tests and metrics."""

    calls: int = 0
    rows: int = 0
    max_rows: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.calls += 1
            self.rows += rows
            self.max_rows = max(self.max_rows, rows)
            self.seconds += seconds

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {"calls": self.calls, "rows": self.rows, "max_rows": self.max_rows,
                    "seconds": round(self.seconds, 6)}


@dataclass
class Served:
    version: ModelVersion
    batcher: Batcher
    stats: BatchStats
    runtime: Runtime
    drift: DriftMonitor | None = None

    def observe(self, inputs: dict[str, np.ndarray]) -> None:
        """Numeric inputs of a message, for drift (text is observed by its runtime)."""
        if self.drift is not None and self.drift.kind == "histograms" and inputs:
            self.drift.observe(next(iter(inputs.values())))

    def snapshot(self) -> dict[str, float]:
        extra = getattr(self.runtime, "stats", None)
        return {**self.stats.snapshot(), **(extra.snapshot() if extra else {})}


class ModelPool:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.repo = open_repository(settings)
        self._served: dict[str, Served] = {}
        self.metrics = WorkerMetrics(settings.device)
        self._latest = CachedResolver(self.repo, LATEST_TTL)
        self._lock = threading.Lock()
        self._catalog: Publisher | None = None

    def get(self, name: str, version: int | None = None, variant: str | None = None) -> Served:
        resolved = self._resolve(ModelRef(name, variant, version))
        served = self._served.get(resolved.key)
        if served is not None:
            return served
        with self._lock:
            if resolved.key not in self._served:
                self._served[resolved.key] = self._load(resolved)
            return self._served[resolved.key]

    def _resolve(self, ref: ModelRef) -> ModelVersion:
        """A pinned version is fixed; otherwise re-read the repository every few seconds,
        so a new version or a new default is served without a restart (hot reload)."""
        if ref.version is not None:
            return self.repo.resolve(ref)
        return self._latest.resolve(ref)

    def _load(self, version: ModelVersion) -> Served:
        s = self.settings
        version = self.repo.materialize(version)  # from a bucket: downloaded, checked
        version.verify()
        runtime = load_runtime(version, threads=s.effective_ort_threads(), device=s.device)
        runtime.warm_up(s.max_batch_rows)
        stats = BatchStats()
        manifest = version.manifest

        def on_batch(rows: int, seconds: float) -> None:
            stats.record(rows, seconds)
            self.metrics.batch(manifest, rows, seconds)

        batcher = Batcher(faults.wrap(runtime.run, s.fault_injection), name=version.key,
                          max_batch_rows=s.max_batch_rows, max_delay_ms=s.max_delay_ms,
                          on_batch=on_batch, transient_retries=s.task_max_retries,
                          device_lost=is_device_lost if s.device.startswith("cuda")
                          else lambda exc: False)
        self.metrics.model_loaded(manifest)
        batcher.start()
        drift = DriftMonitor.from_reference(manifest.reference_stats)
        if drift is not None:
            self.metrics.watch_drift(manifest, drift.score)
            if drift.kind == "token_lengths":
                runtime.on_lengths = drift.observe  # type: ignore[attr-defined]
        return Served(version, batcher, stats, runtime, drift)

    def drift_states(self) -> dict[str, dict[str, object]]:
        """Each served version's drift counts (``workers/drift.py``), for ``inferq drift``."""
        return {key: s.drift.state() for key, s in self._served.items() if s.drift is not None}

    def stats(self) -> dict[str, dict[str, float]]:
        return {key: served.snapshot() for key, served in self._served.items()}

    def publish_catalog(self, names: list[str]) -> None:
        """Keep ``names``' manifests in the result store's catalog (shared/catalog.py)."""
        self._catalog = Publisher(self.settings, self.repo, names).start()

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.stop()
        for served in self._served.values():
            served.batcher.stop()
