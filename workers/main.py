"""Starting a worker: a standalone process (``inferq worker``) or an in-process thread."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.utils.nodenames import host_format
from celery.worker import WorkController

from shared import tracing
from shared.celery_app import make_app
from shared.errors import ConfigError
from shared.queues import model_queues
from shared.repository import open_repository
from shared.settings import Settings
from workers.pool import ModelPool
from workers.tasks import register_tasks

logger = logging.getLogger(__name__)


def _survive_restore_without_connection() -> None:
    """kombu 5.7's Redis transport can crash the worker ("Unrecoverable error:
    AttributeError: 'NoneType' object has no attribute 'hostname'") when the broker drops
    while it closes a channel: restoring the channel's unacked messages then needs a
    connection that is gone. Those messages stay recorded as unacked in Redis and the
    visibility sweep of any worker restores them, so the worker logs it and goes on."""
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "_inferq", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original(self, client)
        except AttributeError as exc:
            logger.warning("could not restore unacked messages while closing a channel "
                           "(%s); the visibility sweep will", exc)

    restore_unacked._inferq = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]


def prepare(settings: Settings, models: list[str] | None, app: Celery | None = None
            ) -> tuple[Celery, ModelPool, list[str]]:
    """Build the app, load and warm every served model before consuming anything."""
    repo = open_repository(settings)
    models = models or repo.names()
    if not models:
        raise ConfigError(
            f"INFERQ_MODEL_REPO: no models in {repo.location}; "
            "build them with `inferq models build` or pass --models")
    app = app or make_app(settings)
    _survive_restore_without_connection()
    # Celery logs every success at INFO with the result's repr: with numpy outputs that
    # formatting cost more worker CPU than a small model call. Failures still log. Its
    # `Task … received` line per message sat on the consumer thread before each hand-off.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    # The threads pool traces tasks through the current (thread-local, else default) app.
    app.set_current()
    app.set_default()
    pool = ModelPool(settings)
    if settings.metrics_port:
        pool.metrics.serve(settings.metrics_port)
    for name in models:
        pool.get(name)
    pool.publish_catalog(models)  # clients validate against it (shared/catalog.py)
    register_tasks(app, pool)
    app.conf.task_queues = [q for name in models for q in model_queues(settings, name)]
    return app, pool, models


def run_worker(settings: Settings, models: list[str] | None = None, *,
               concurrency: int | None = None, hostname: str | None = None,
               loglevel: str = "INFO") -> int:
    """Run a Celery worker (threads pool) until it is told to stop; returns its exit code."""
    tracing.setup(settings.tracing, "inferq-worker")
    app, pool, models = prepare(settings, models)
    worker = app.Worker(
        pool_cls="threads", concurrency=concurrency or settings.concurrency,
        queues=[q.name for q in app.conf.task_queues],
        hostname=host_format(hostname or f"inferq.{os.getpid()}@%h"), loglevel=loglevel,
        without_mingle=True, without_gossip=True,
    )
    logger.info("worker serving %s", ", ".join(models))
    try:
        worker.start()
    finally:
        pool.close()
    return int(worker.exitcode or 0)


class _ReadyWorker(WorkController):
    """A WorkController that says when its consumer is ready (for in-process use)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


@contextmanager
def embedded_worker(settings: Settings, app: Celery, models: list[str] | None = None
                    ) -> Iterator[ModelPool]:
    """A worker on a thread of this process: the embedded default needs no broker."""
    app, pool, _ = prepare(settings, models, app)
    worker = _ReadyWorker(
        app=app, pool_cls="threads", concurrency=settings.concurrency,
        queues=[q.name for q in app.conf.task_queues], hostname="embedded@inferq",
        loglevel="WARNING", without_heartbeat=True, without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="inferq-embedded-worker", daemon=True)
    thread.start()
    if not worker.ready.wait(30):
        raise RuntimeError("the embedded worker did not start within 30 s")
    try:
        yield pool
    finally:
        worker.stop(in_sighandler=False)
        thread.join(10)
        pool.close()
