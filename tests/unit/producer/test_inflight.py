"""Which single jobs count as passed by later ones (producer/inflight.py)."""

from __future__ import annotations

from producer.inflight import LATER_PROBED, InFlight
from shared.repository import ModelRef

REF = ModelRef("digits", None, None)


def sent(inflight: InFlight, job_id: str, priority: str = "normal") -> None:
    inflight.add(job_id, REF, {"image": [0.0]}, priority, None, replying=True)


def test_later_jobs_of_the_same_priority_are_probed_newest_first() -> None:
    inflight = InFlight()
    for i in range(20):
        sent(inflight, f"n{i}")
        sent(inflight, f"h{i}", "high")
    first = inflight.pop("n0")
    assert first is not None
    later = inflight.later(first)
    assert later == [f"n{i}" for i in range(19, 19 - LATER_PROBED, -1)]


def test_a_finished_high_job_does_not_pass_a_normal_one() -> None:
    inflight = InFlight()
    sent(inflight, "normal")
    sent(inflight, "high", "high")
    normal, high = inflight.pop("normal"), inflight.pop("high")
    assert normal is not None and high is not None
    inflight.finished(high)
    assert not inflight.passed(normal)
    sent(inflight, "normal-2")
    later = inflight.pop("normal-2")
    assert later is not None
    inflight.finished(later)
    assert inflight.passed(normal) and not inflight.passed(later)


def test_only_the_newest_jobs_are_kept() -> None:
    inflight = InFlight(kept=3)
    for i in range(5):
        sent(inflight, f"j{i}")
    assert inflight.pop("j1") is None and inflight.pop("j2") is not None
