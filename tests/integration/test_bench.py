"""Smoke test of the benchmark: a quick run on digits writes every mode to the JSON file.

Slow (a minute or two, builds digits into bench/.models on first use) and not in CI. It
checks the shape of the results only; a test never asserts on speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, need

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIGITS_MODES = {"limit", "naive-bulk", "naive-online", "bulk", "online", "worker-rss",
                "producer-rss"}


@pytest.mark.timeout(900)
def test_quick_bench_reports_every_mode(tmp_path):
    need(6379, "Redis")
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--models", "digits", "--json",
         str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = data["results"]
    assert {r["mode"] for r in results} == DIGITS_MODES
    assert {r["concurrency"] for r in results if r["mode"] == "online"} == {1, 16, 64}
    for r in results:
        if r["mode"] in ("limit", "bulk", "online", "naive-bulk", "naive-online"):
            assert r["rows"] > 0 and r["rows_per_s"] > 0, r
            assert not r["extra"].get("errors"), r
    assert data["meta"]["ort_threads"] >= 1
    bulk = next(r for r in results if r["mode"] == "bulk")
    assert bulk["extra"]["chunk_rows"] == 4096  # sized for digits (producer/bulk/chunks.py)
    assert {t["target"].split(" (")[0] for t in data["targets"]} >= {
        ">=150,000 rows/s", ">=0.8 x limit", ">=3 x naive", "p50 <=1.2 x naive p50",
        "<=300 MB"}
    assert "rows/s" in proc.stdout and "x limit" in proc.stdout  # the printed table
