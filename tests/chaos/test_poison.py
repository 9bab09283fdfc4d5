"""A poison row (the model raises on it) fails alone: every other row gets its result."""

from __future__ import annotations

import numpy as np
import pytest

from tests.chaos.harness import broker_name, settle, tiled, worker_env
from tests.conftest import client_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

POISON_ROW = 417


@pytest.mark.timeout(120)
def test_poison_row_fails_alone(broker_env, start_worker, digits, fault_log, chaos_report):
    row = chaos_report("poison row (model raises on it)", broker_name(broker_env))
    x, labels = tiled(digits, 1_000)
    x = x.copy()
    x[POISON_ROW].flat[0] = -7  # raise_on=-7: the model raises on a row starting with -7
    start_worker(worker_env(broker_env, fault_log, "raise_on=-7"), "--concurrency", "4")
    handle = client_for(broker_env).submit_many("digits", x, chunk_rows=250)
    row.jobs, row.rows = len(handle.chunks), len(x)
    parts = list(handle.iter_results(timeout=60))
    settle(row, parts, len(x), fault_log, None, expected_errors=1)
    ok = np.concatenate([p.ok for p in parts])
    errors = {r: m for p in parts for r, m in p.errors.items()}
    assert int(ok.sum()) == 999
    assert list(errors) == [POISON_ROW]
    assert f"row {POISON_ROW}" in errors[POISON_ROW]
    assert "injected fault" in errors[POISON_ROW]
    keep = np.arange(len(x)) != POISON_ROW
    np.testing.assert_array_equal(np.concatenate([p.outputs["label"] for p in parts])[keep],
                                  labels[keep])
