"""The client side: the SDK, bulk scoring, the CLI, the HTTP API. Imports ``shared`` only.

``Client`` (direct broker access) needs the ``client`` extra and is imported on first use,
so ``producer.http`` works on a base install without Celery.
"""

from typing import Any

__all__ = ["Client", "Job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from producer import client

        return getattr(client, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
