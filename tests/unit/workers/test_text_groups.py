"""How many rows of a text batch share one padded model call."""

from __future__ import annotations

import pytest

from workers.runtimes.text import group_rows_for


@pytest.mark.parametrize(("threads", "device", "rows"), [
    (1, "cpu", 8), (2, "cpu", 16), (4, "cpu", 32), (16, "cpu", 64),
    (1, "cuda:0", 64), (8, "cuda", 64),
])
def test_cpu_groups_are_small_and_gpu_groups_wide(threads: int, device: str,
                                                  rows: int) -> None:
    assert group_rows_for(threads, device) == rows


def test_all_cores_counts_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert group_rows_for(0, "cpu") == 24
