"""The client library: the SDK (``Client``), bulk scoring, files, the HTTP client. Imports
``shared`` only.

``Client`` and ``AsyncClient`` (direct broker access) need the ``client`` extra and are
imported on first use, so ``producer.http`` works on a base install without Celery.
"""

from typing import Any

__all__ = ["AsyncClient", "AsyncJob", "Client", "Job"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "Job"):
        from producer import client

        return getattr(client, name)
    if name in ("AsyncClient", "AsyncJob"):
        from producer import aclient

        return getattr(aclient, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
