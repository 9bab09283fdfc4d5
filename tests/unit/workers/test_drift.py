"""Drift scores on real data: held-out digits stay under the threshold, shifted or noised
digits cross it; text lengths likewise."""

from __future__ import annotations

import numpy as np
import pytest

from workers.build.digits import split
from workers.drift import (
    DRIFT_THRESHOLD,
    SAMPLE_ROWS,
    WATCH_THRESHOLD,
    DriftMonitor,
    histogram_reference,
    report,
)


@pytest.fixture(scope="module")
def digits_split() -> tuple[np.ndarray, np.ndarray]:
    x_train, x_test, _, _ = split(0)
    return x_train, x_test


def monitor_for(x_train: np.ndarray) -> DriftMonitor:
    monitor = DriftMonitor.from_reference(histogram_reference(x_train))
    assert monitor is not None
    return monitor


def feed(monitor: DriftMonitor, x: np.ndarray, message_rows: int = 8) -> None:
    for start in range(0, len(x), message_rows):  # as a worker sees messages
        monitor.observe(x[start:start + message_rows])


def test_held_out_digits_are_not_drift(digits_split) -> None:
    x_train, x_test = digits_split
    monitor = monitor_for(x_train)
    feed(monitor, x_test)
    score = monitor.score()
    print(f"\nheld-out digits: PSI {score:.4f}")
    assert score is not None and score < WATCH_THRESHOLD


@pytest.mark.parametrize("change", ["brighter", "noise", "shifted"])
def test_changed_digits_cross_the_threshold(digits_split, change: str) -> None:
    x_train, x_test = digits_split
    rng = np.random.default_rng(0)
    x = {"brighter": np.clip(x_test + 4, 0, 16),
         "noise": np.clip(x_test + rng.normal(0, 4, x_test.shape), 0, 16),
         "shifted": np.roll(x_test, 2, axis=-1)}[change].astype(np.float32)
    monitor = monitor_for(x_train)
    feed(monitor, x)
    score = monitor.score()
    print(f"\n{change} digits: PSI {score:.4f}")
    assert score is not None and score > DRIFT_THRESHOLD


def test_no_score_before_enough_rows_and_recent_rows_weigh_most(digits_split) -> None:
    x_train, x_test = digits_split
    monitor = monitor_for(x_train)
    monitor.observe(x_test[:50])
    assert monitor.score() is None
    feed(monitor, x_test)
    feed(monitor, np.tile(np.clip(x_test + 4, 0, 16), (20, 1, 1, 1)).astype(np.float32))
    assert monitor.score() > DRIFT_THRESHOLD  # type: ignore[operator]
    feed(monitor, np.tile(x_test, (80, 1, 1, 1)))  # back to normal: the shift decays away
    assert monitor.score() < WATCH_THRESHOLD  # type: ignore[operator]


def test_large_messages_are_sampled(digits_split) -> None:
    x_train, x_test = digits_split
    monitor = monitor_for(x_train)
    monitor.observe(np.tile(x_test, (4, 1, 1, 1)))  # one 1,440-row message
    assert monitor.rows == SAMPLE_ROWS == 16


def test_workers_states_add_up_in_the_report(digits_split) -> None:
    x_train, x_test = digits_split
    a, b = monitor_for(x_train), monitor_for(x_train)
    feed(a, x_test[:180])
    feed(b, x_test[180:])
    r = report([a.state(), b.state()])
    assert r["rows"] == len(x_test) and r["verdict"] == "ok"
    brighter = monitor_for(x_train)
    feed(brighter, np.clip(x_test + 4, 0, 16))
    r = report([brighter.state()])
    assert r["verdict"] == "drift" and len(r["features"]) == 5
    assert r["features"][0]["psi"] >= r["features"][-1]["psi"]


def test_token_lengths() -> None:
    bins = [1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 257]
    rng = np.random.default_rng(1)
    reference = rng.integers(5, 40, 2000)
    counts, _ = np.histogram(reference, bins=bins)
    stats = {"kind": "token_lengths", "bins": bins, "counts": counts.tolist()}
    same, longer = DriftMonitor.from_reference(stats), DriftMonitor.from_reference(stats)
    assert same is not None and longer is not None
    same.observe(rng.integers(5, 40, 1000))
    longer.observe(rng.integers(60, 200, 1000))
    assert same.score() < WATCH_THRESHOLD < DRIFT_THRESHOLD < longer.score()  # type: ignore[operator]


def test_no_reference_no_monitor() -> None:
    assert DriftMonitor.from_reference({}) is None
    assert DriftMonitor.from_reference({"kind": "features", "mean": [0.0]}) is None
