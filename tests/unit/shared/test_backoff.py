"""The one delay formula (shared/backoff.py) every retry and poll loop uses."""

from __future__ import annotations

import itertools

from shared import backoff


def test_exponential_doubles_from_first_up_to_the_cap() -> None:
    assert [backoff.exponential(a, 0.25, 5.0) for a in range(7)] == \
        [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.exponential(-1, 0.25, 5.0) == 0.25  # attempt numbering from 1 is safe


def test_jitter_stays_within_its_factors() -> None:
    for attempt in range(8):
        base = backoff.exponential(attempt, 0.1, 2.0)
        spread = [backoff.exponential(attempt, 0.1, 2.0, backoff.SPREAD) for _ in range(200)]
        below = [backoff.exponential(attempt, 0.1, 2.0, backoff.BELOW) for _ in range(200)]
        assert all(0.5 * base <= d <= 1.5 * base for d in spread)
        assert all(0.5 * base <= d <= base for d in below)
        assert len(set(spread)) > 100  # really random: retries of many processes drift apart


def test_pauses_double_to_the_cap_and_never_end() -> None:
    assert list(itertools.islice(backoff.pauses(0.001, 0.005), 6)) == \
        [0.001, 0.002, 0.004, 0.005, 0.005, 0.005]
