"""The dead-letter list: jobs and rows that were not run, and why (``inferq dead-letters``).

Workers append (``workers/deliveries.py``); anyone with the result store reads. One Redis
list per queue prefix, newest first, JSON entries: ``at``, ``reason``, ``message_id``,
``task``, ``model``, ``jobs``, ``rows``, ``deliveries``, ``history`` and, for a single
row, its ``inputs``.
"""

from __future__ import annotations

import json
from typing import Any

from shared import keys


def read_dead_letters(redis: Any, queue_prefix: str, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` entries first."""
    raw = redis.lrange(keys.dead_letters(queue_prefix), 0, max(0, limit - 1))
    return [json.loads(r) for r in raw]


def purge_dead_letters(redis: Any, queue_prefix: str) -> int:
    """Delete every entry; how many there were."""
    key = keys.dead_letters(queue_prefix)
    pipe = redis.pipeline(transaction=True)
    pipe.llen(key)
    pipe.delete(key)
    return int(pipe.execute()[0])
