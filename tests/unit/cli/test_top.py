"""``inferq top`` without a broker: snapshots from fake sources, frames from snapshots."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import pytest
from rich.console import Console

from cli.top import (
    ModelRow,
    Snapshot,
    Sources,
    VersionRow,
    queues_of,
    render,
    snapshot,
    stats_of,
)
from shared.settings import load_settings

QUEUES = {"digits": {"normal": "p.infer.digits", "high": "p.infer.digits.high"},
          "minilm": {"normal": "p.infer.minilm", "high": "p.infer.minilm.high"}}


def text_of(snap: Snapshot, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(render(snap))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)


def row_of(text: str, *cells: str) -> list[str]:
    """The cells of the first table line holding every one of ``cells``."""
    for line in text.splitlines():
        parts = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if all(c in parts for c in cells):
            return parts
    raise AssertionError(f"no row with {cells} in:\n{text}")


class Fake:
    """Sources whose answers a test sets; each can be made to raise."""

    def __init__(self) -> None:
        self.depth: dict[str, int] = {}
        self.alive: list[str] = []
        self.replies: dict[str, dict[str, dict[str, float]]] = {}
        self.dead: tuple[int, dict[str, Any] | None] = (0, None)
        self.fail: dict[str, Exception] = {}
        self.asked: list[list[str]] = []

    def _check(self, what: str) -> None:
        if what in self.fail:
            raise self.fail[what]

    def depths(self, names: Sequence[str]) -> dict[str, int]:
        self._check("depths")
        return {n: self.depth.get(n, 0) for n in names}

    def ping(self) -> list[str]:
        self._check("ping")
        return list(self.alive)

    def stats(self, workers: list[str]) -> dict[str, dict[str, dict[str, float]]]:
        self.asked.append(workers)
        self._check("stats")
        return {w: s for w, s in self.replies.items() if w in workers}

    def dead_letters(self) -> tuple[int, dict[str, Any] | None]:
        self._check("dead")
        return self.dead

    def sources(self) -> Sources:
        return Sources(self.depths, self.ping, self.stats, self.dead_letters)


def counters(calls: int, rows: int, seconds: float, max_rows: int = 64) -> dict[str, float]:
    return {"calls": calls, "rows": rows, "max_rows": max_rows, "seconds": seconds}


def fabricated() -> Snapshot:
    return Snapshot(
        at=1_700_000_000.0, t=10.0,
        models=[ModelRow("digits", QUEUES["digits"], {"normal": 12_345, "high": 7}),
                ModelRow("minilm", QUEUES["minilm"], {"normal": None, "high": None})],
        workers=["gpu0@host-a", "gpu1@host-b", "cpu0@host-c"],
        versions=[VersionRow("gpu0@host-a", "digits@1", 100, 6_400, 64, 2.5, 1_500.0, 60.0,
                             0.42),
                  VersionRow("gpu1@host-b", "digits@1", 50, 3_200, 64, 1.0, 500.25, 32.0,
                             0.1)],
        silent=["cpu0@host-c"], dead_letters=3,
        newest_dead={"at": 1_700_000_000.0, "model": "digits", "reason": "killed its "
                     "worker 8 times"},
        errors=["queue depths (broker): ConnectionError: refused"])


def test_render_shows_queues_workers_rates_and_dead_letters() -> None:
    text = text_of(fabricated())
    assert "2023-11-14 22:13:20 UTC" in text
    assert row_of(text, "digits", "p.infer.digits") == [
        "digits", "p.infer.digits", "12,345", "7", "2", "2,000.2"]  # rows/s: both workers
    assert row_of(text, "minilm") == ["minilm", "p.infer.minilm", "-", "-", "0", "-"]
    assert "workers: 3 alive" in text
    assert row_of(text, "gpu0@host-a") == [
        "gpu0@host-a", "digits@1", "100", "6,400", "64", "60.0", "1,500.0", "42%"]
    assert row_of(text, "gpu1@host-b")[5:] == ["32.0", "500.2", "10%"]
    assert "no inferq_stats reply" in row_of(text, "cpu0@host-c")[1]
    assert "dead letters: 3" in text and "digits: killed its worker 8 times" in text
    assert "error: queue depths (broker): ConnectionError: refused" in text


def test_a_first_frame_has_no_rates_but_lifetime_batch_size() -> None:
    snap = Snapshot(0.0, 0.0, [], ["w@h"], [VersionRow("w@h", "digits@1", 4, 10, 5, 0.1)],
                    dead_letters=None, store=False)
    text = text_of(snap)
    assert row_of(text, "w@h")[2:] == ["4", "10", "5", "2.5", "-", "-"]
    assert "dead letters: - (no Redis result store)" in text


def test_long_worker_names_wrap_rather_than_being_cut() -> None:
    name = "inferq.123456@a-rather-long-host-name.example.internal"
    snap = Snapshot(0.0, 0.0, [], [name], [VersionRow(name, "digits@1", 1, 1, 1, 0.0)])
    text = text_of(snap, width=60)
    first_cells = "".join(line.split("│")[1].strip() for line in text.splitlines()
                          if line.startswith("│"))
    assert first_cells == name  # folded over lines, every character kept


def test_snapshot_reads_every_source_and_rates_against_the_previous() -> None:
    fake = Fake()
    fake.depth = {"p.infer.digits": 40, "p.infer.digits.high": 2}
    fake.alive = ["w1@h", "w2@h"]
    fake.replies = {"w1@h": {"digits@1": counters(10, 100, 1.0)},
                    "w2@h": {"digits@1": counters(5, 20, 0.5), "minilm@2": counters(0, 0, 0)}}
    fake.dead = (2, {"model": "digits"})
    clock = iter([100.0, 102.0]).__next__
    first = snapshot(fake.sources(), QUEUES, clock=clock)
    assert first.errors == [] and first.workers == ["w1@h", "w2@h"] and first.silent == []
    assert first.models[0].waiting == {"normal": 40, "high": 2}
    assert (first.dead_letters, first.newest_dead) == (2, {"model": "digits"})
    assert all(v.rows_per_s is None for v in first.versions)
    assert fake.asked == [["w1@h", "w2@h"]]

    fake.replies["w1@h"]["digits@1"] = counters(20, 900, 1.5)  # +10 calls, +800 rows
    second = snapshot(fake.sources(), QUEUES, first, clock=clock)
    w1 = next(v for v in second.versions if v.worker == "w1@h")
    assert (w1.rows_per_s, w1.mean_batch, w1.busy) == (400.0, 80.0, 0.25)
    idle = next(v for v in second.versions if v.worker == "w2@h" and v.key == "digits@1")
    assert (idle.rows_per_s, idle.mean_batch, idle.busy) == (0.0, None, 0.0)
    assert second.model_rate("digits") == 400.0 and second.serving("digits") == 2
    assert second.model_rate("minilm") == 0.0


def test_a_restarted_worker_counts_from_zero_not_negative() -> None:
    fake = Fake()
    fake.alive = ["w@h"]
    fake.replies = {"w@h": {"digits@1": counters(100, 5_000, 10.0)}}
    clock = iter([0.0, 1.0]).__next__
    first = snapshot(fake.sources(), QUEUES, clock=clock)
    fake.replies = {"w@h": {"digits@1": counters(3, 30, 0.2)}}
    [v] = snapshot(fake.sources(), QUEUES, first, clock=clock).versions
    assert (v.rows_per_s, v.mean_batch) == (30.0, 10.0)


def test_a_failing_source_is_an_error_line_and_the_rest_is_still_read() -> None:
    fake = Fake()
    fake.alive = ["w@h", "mute@h"]
    fake.replies = {"w@h": {"digits@1": counters(1, 8, 0.1)}}
    fake.fail = {"depths": ConnectionError("redis://:hunter2@broker:6379 refused"),
                 "dead": TimeoutError("store")}
    snap = snapshot(fake.sources(), QUEUES)
    assert snap.models[0].waiting == {"normal": None, "high": None}
    assert snap.workers == ["mute@h", "w@h"] and snap.silent == ["mute@h"]
    assert [v.worker for v in snap.versions] == ["w@h"]
    assert snap.dead_letters is None and snap.store
    assert "dead letters: - (not read)" in text_of(snap)
    assert snap.errors == [
        "queue depths (broker): ConnectionError: redis://:***@broker:6379 refused",
        "dead letters (result store): TimeoutError: store"]


def test_workers_that_answer_ping_are_listed_when_their_stats_fail() -> None:
    fake = Fake()
    fake.alive = ["w@h"]
    fake.fail = {"stats": TimeoutError("no reply")}
    snap = snapshot(fake.sources(), QUEUES)
    assert snap.workers == ["w@h"] and snap.silent == ["w@h"] and snap.versions == []
    assert snap.errors == ["workers (inferq_stats): TimeoutError: no reply"]


def test_no_live_worker_asks_no_stats() -> None:
    fake = Fake()
    snap = snapshot(fake.sources(), QUEUES)
    assert snap.workers == [] and snap.versions == [] and fake.asked == []
    assert "workers: 0 alive" in text_of(snap)


def test_stats_replies_keep_only_model_counters() -> None:
    digits = counters(3, 30, 0.1)
    assert stats_of([{"a@h": {"digits@1": digits}},
                     {"b@h": {"error": "No such command 'inferq_stats'"}},
                     {"c@h": "garbage"}, {"d@h": {}}]) == {"a@h": {"digits@1": digits}}
    assert stats_of(None) == {}


def test_queues_are_the_models_normal_and_high_queues() -> None:
    settings = load_settings(queue_prefix="p.")
    assert queues_of(settings, ["digits"]) == {
        "digits": {"normal": "p.infer.digits", "high": "p.infer.digits.high"}}


def test_top_needs_a_broker(monkeypatch) -> None:
    from cli.top import open_sources
    from shared.errors import ConfigError

    monkeypatch.delenv("INFERQ_BROKER_URL", raising=False)
    with pytest.raises(ConfigError, match="INFERQ_BROKER_URL"), \
            open_sources(load_settings(broker_url=None)):
        pass
