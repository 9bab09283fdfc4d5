"""How long to wait before trying again: one formula for every retry and poll loop.

Each loop keeps its own stop condition (a deadline, a retry budget, ``Retry-After``, a
queue of due callbacks), which is why no retry library wraps them; only the delays are
shared. Standard library only: the HTTP client uses it on a base install.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

SPREAD = (0.5, 1.5)  # jitter both ways: processes that failed together retry apart
BELOW = (0.5, 1.0)  # jitter that never waits longer than the formula says


def exponential(attempt: int, first: float, cap: float,
                jitter: tuple[float, float] | None = None) -> float:
    """``first * 2**attempt`` seconds, at most ``cap``, times a random factor drawn from
    ``jitter`` (low, high) when given. ``attempt`` 0 is the first retry."""
    delay = min(cap, first * 2 ** max(0, attempt))
    return delay if jitter is None else delay * random.uniform(*jitter)


def pauses(first: float, cap: float) -> Iterator[float]:
    """Pauses between polls: ``first``, doubling, at most ``cap``, for ever."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, cap)
