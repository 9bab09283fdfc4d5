"""``inferq api``: one process, or ``--workers N`` processes sharing the port.

With several, uvicorn's supervisor spawns them and each builds its own app from the
environment (``child_app``): its own coalescer, reply channel, notifier and callback
dispatcher. Everything they must agree on is in Redis already (job records, claims, rate
windows, fair-admission sets, callback leases). ``/metrics`` adds up every process
(prometheus_client's multiprocess mode, files in a temporary folder removed at exit).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from fastapi import FastAPI

from api.app import create_app
from shared.logs import configure
from shared.settings import load_settings

LOG_LEVEL_ENV = "INFERQ_API_PROCESS_LOG_LEVEL"  # from the supervisor to its processes
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run(host: str, port: int, workers: int, log_level: str, json_logs: bool,
        uvicorn: Any) -> None:
    # Keep-alive past clients' usual 5 s idle expiry, so a request never races the close.
    # JSON logs: no uvicorn log config, so its loggers propagate to the JSON handler.
    common: dict[str, Any] = dict(
        host=host, port=port, log_level=log_level.lower(), proxy_headers=True,
        access_log=False, timeout_keep_alive=75,
        log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG)
    application = create_app(load_settings())  # a configuration error stops us here, once
    if workers == 1:
        uvicorn.run(application, **common)
        return
    metrics_dir = tempfile.mkdtemp(prefix="inferq-api-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    os.environ[LOG_LEVEL_ENV] = log_level
    try:
        uvicorn.run(f"{__name__}:child_app", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def child_app() -> FastAPI:
    """What each of ``--workers N`` processes serves (uvicorn imports and calls it)."""
    settings = load_settings()
    configure(os.environ.get(LOG_LEVEL_ENV, "INFO"), settings.log_format)
    return create_app(settings)
