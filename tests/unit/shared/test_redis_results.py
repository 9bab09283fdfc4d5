"""The Redis result store (shared/redis_results.py): no subscription per sent job."""

from __future__ import annotations

from shared import redis_results
from shared.celery_app import make_app
from shared.settings import load_settings


def test_sending_a_job_subscribes_to_nothing() -> None:
    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0?ssl_cert_reqs=none"):
        app = make_app(load_settings(broker_url=url))  # never connected
        backend = app.backend
        assert isinstance(backend, redis_results.RedisBackend)
        backend.on_task_call(None, "job-1")
        assert backend.result_consumer._pubsub is None  # Celery's would subscribe here
        assert backend.client.connection_pool.connection_kwargs["port"] == 1
