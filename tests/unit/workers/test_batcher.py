"""The dynamic batcher: merging, splitting, waiting for announced rows, bisecting failures.

Ordering is made deterministic with events: the fake model blocks its first call on a
gate, so later submissions queue up behind it and are taken together once it opens.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait

import numpy as np
import pytest

from workers.batcher import Batcher, Outcome

WAIT = 5.0  # bound on every wait for something that should happen
POISON = -7.0


class FakeModel:
    """``y = x.sum(axis=1)``; records batch sizes; can hold its first call on a gate."""

    def __init__(self, *, gate_first: bool = False, poison: float | None = None) -> None:
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gate_first:
            self.gate.set()
        self.poison = poison

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.sizes.append(len(x))
            first = len(self.sizes) == 1
        if first:
            self.entered.set()
            assert self.gate.wait(WAIT), "test never opened the gate"
        if self.poison is not None and (x[:, 0] == self.poison).any():
            raise ValueError("poisoned row")
        return {"y": x.sum(axis=1), "x2": x * 2}

    def calls(self) -> list[int]:
        with self._lock:
            return list(self.sizes)


def rows(n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.arange(start * 3, (start + n) * 3, dtype=np.float32).reshape(n, 3)}


def expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return inputs["x"].sum(axis=1)


Make = Callable[..., Batcher]


@pytest.fixture
def make() -> Iterator[Make]:
    """Builds and starts batchers named toy@1; stops them (opening any gate) afterwards."""
    started: list[Batcher] = []
    models: list[FakeModel] = []

    def make(model: object, *, max_batch_rows: int = 64, max_delay_ms: float = 0.0,
             **kw: object) -> Batcher:
        if isinstance(model, FakeModel):
            models.append(model)
        b = Batcher(model, name="toy@1", max_batch_rows=max_batch_rows,  # type: ignore[arg-type]
                    max_delay_ms=max_delay_ms, **kw)  # type: ignore[arg-type]
        b.start()
        started.append(b)
        return b

    yield make
    for model in models:
        model.gate.set()
    for b in started:
        b.stop(timeout=WAIT)


def gated(make: Make, **kw: object) -> tuple[Batcher, FakeModel]:
    """A batcher whose model is busy on a 1-row gate job until ``model.gate.set()``."""
    model = FakeModel(gate_first=True, poison=kw.pop("poison", None))  # type: ignore[arg-type]
    b = make(model, **kw)
    b.submit(rows(1, start=1000))
    assert model.entered.wait(WAIT), "the batcher never called the model"
    return b, model


def result(future: Future[Outcome]) -> Outcome:
    return future.result(timeout=WAIT)


# -- outputs --------------------------------------------------------------------------------
def test_each_job_gets_its_own_outputs_in_order(make: Make) -> None:
    b = make(FakeModel())
    jobs = [rows(n, start=10 * i) for i, n in enumerate([1, 3, 2, 5])]
    futures = [b.submit(j) for j in jobs]
    for job, fut in zip(jobs, futures, strict=True):
        out = result(fut)
        assert out.errors == {}
        np.testing.assert_array_equal(out.outputs["y"], expected(job))
        np.testing.assert_array_equal(out.outputs["x2"], job["x"] * 2)


def test_zero_row_job_completes_at_once_without_a_model_call(make: Make) -> None:
    model = FakeModel()
    b = make(model)
    out = result(b.submit({"x": np.zeros((0, 3), np.float32)}))
    assert out == Outcome(outputs=None, errors={}, batch_rows=[])
    assert model.calls() == []


def test_concurrent_submits_are_merged_into_one_batch(make: Make) -> None:
    b, model = gated(make, max_batch_rows=64)
    jobs = [rows(1 + i % 3, start=10 * i) for i in range(12)]
    futures: list[Future[Outcome] | None] = [None] * len(jobs)

    def submit(i: int) -> None:
        futures[i] = b.submit(jobs[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    model.gate.set()

    outcomes = [result(f) for f in futures]  # type: ignore[arg-type]
    total = sum(len(j["x"]) for j in jobs)
    assert model.calls() == [1, total]
    for job, out in zip(jobs, outcomes, strict=True):
        np.testing.assert_array_equal(out.outputs["y"], expected(job))
        assert out.batch_rows == [total]


def test_no_batch_exceeds_max_batch_rows(make: Make) -> None:
    b, model = gated(make, max_batch_rows=4)
    jobs = [rows(n, start=10 * i) for i, n in enumerate([1, 1, 3, 2, 4, 1, 1, 1, 2])]
    futures = [b.submit(j) for j in jobs]
    model.gate.set()
    for job, fut in zip(jobs, futures, strict=True):
        np.testing.assert_array_equal(result(fut).outputs["y"], expected(job))
    sizes = model.calls()[1:]
    assert sum(sizes) == sum(len(j["x"]) for j in jobs)
    assert max(sizes) <= 4
    assert any(s > 1 for s in sizes)
    assert sizes == [2, 3, 2, 4, 3, 2]  # greedy, in arrival order, never splitting a part


def test_job_bigger_than_max_batch_rows_is_split_and_reassembled(make: Make) -> None:
    model = FakeModel()
    b = make(model, max_batch_rows=4)
    job = rows(10)
    out = result(b.submit(job))
    assert model.calls() == [4, 4, 2]
    assert out.batch_rows == [4, 4, 2]
    assert out.errors == {}
    np.testing.assert_array_equal(out.outputs["y"], expected(job))
    np.testing.assert_array_equal(out.outputs["x2"], job["x"] * 2)


def test_on_batch_hook_sees_every_model_call(make: Make) -> None:
    seen: list[tuple[int, float]] = []
    b = make(FakeModel(), max_batch_rows=3, on_batch=lambda n, secs: seen.append((n, secs)))
    result(b.submit(rows(7)))
    assert [n for n, _ in seen] == [3, 3, 1]
    assert all(secs >= 0 for _, secs in seen)


# -- waiting ---------------------------------------------------------------------------------
def test_lone_job_is_not_held_for_the_delay(make: Make) -> None:
    model = FakeModel()
    b = make(model, max_delay_ms=10_000)
    out = b.submit(rows(2)).result(timeout=2)  # far below the 10 s delay
    assert model.calls() == [2]
    np.testing.assert_array_equal(out.outputs["y"], expected(rows(2)))


class ThreadModel(FakeModel):
    """FakeModel that records which thread made each call and how many ran at once."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.threads: list[str] = []
        self.running = 0
        self.most_at_once = 0

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return super().__call__(inputs)
        finally:
            with self._lock:
                self.running -= 1


def test_a_lone_job_submitted_here_runs_on_the_callers_thread(make: Make) -> None:
    model = ThreadModel()
    b = make(model)
    future = b.submit(rows(2), here=True)
    assert future.done(), "an idle batcher should have run the call before returning"
    np.testing.assert_array_equal(result(future).outputs["y"], expected(rows(2)))
    assert model.threads == [threading.current_thread().name]
    # without ``here`` the batcher thread runs it, as before
    result(b.submit(rows(1)))
    assert model.threads[-1] == "batcher-toy@1"


def test_here_queues_behind_a_running_call_and_calls_never_overlap(make: Make) -> None:
    model = ThreadModel(gate_first=True)
    b = make(model)
    first: list[Future[Outcome]] = []
    caller = threading.Thread(target=lambda: first.append(b.submit(rows(1), here=True)),
                              name="task-1")
    caller.start()
    assert model.entered.wait(WAIT), "the inline call never started"
    # the model is busy on task-1's own call: these queue for the batcher thread
    queued = [b.submit(rows(2, start=5 * i), here=True) for i in range(3)]
    assert not any(f.done() for f in queued)
    model.gate.set()
    caller.join(WAIT)
    outs = [result(f) for f in queued]
    assert model.threads == ["task-1", "batcher-toy@1"]
    assert model.calls() == [1, 6] and model.most_at_once == 1
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out.outputs["y"], expected(rows(2, start=5 * i)))
    assert result(first[0]).batch_rows == [1]


def test_here_waits_for_announced_rows_like_any_submit(make: Make) -> None:
    model = ThreadModel()
    b = make(model, max_delay_ms=10_000)
    with b.announced():
        future = b.submit(rows(1), here=True)  # another task's rows are on their way
        assert not future.done()
    result(future)
    assert model.threads == ["batcher-toy@1"]


def test_here_with_more_rows_than_a_batch_goes_to_the_batcher(make: Make) -> None:
    model = ThreadModel()
    b = make(model, max_batch_rows=4)
    out = result(b.submit(rows(10), here=True))
    np.testing.assert_array_equal(out.outputs["y"], expected(rows(10)))
    assert set(model.threads) == {"batcher-toy@1"} and model.calls() == [4, 4, 2]


def test_a_failing_call_run_here_fails_its_future_and_frees_the_batcher(make: Make) -> None:
    def broken(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise KeyboardInterrupt  # not an Exception: bisection does not catch it

    b = make(broken)
    with pytest.raises(KeyboardInterrupt):
        result(b.submit(rows(1), here=True))
    b._run = FakeModel()  # the next call is not stuck behind the failed one
    np.testing.assert_array_equal(result(b.submit(rows(1))).outputs["y"], expected(rows(1)))


def test_batcher_waits_for_announced_rows(make: Make) -> None:
    model = FakeModel()
    b = make(model, max_delay_ms=10_000)
    early, late = rows(2), rows(3, start=50)
    with b.announced() as ticket:
        first = b.submit(early)
        # the announced rows are not in yet, so the early job must stay queued
        done, _ = wait([first], timeout=0.2)
        assert not done, "batcher ran without waiting for announced rows"
        second = b.submit(late, ticket)
    out1, out2 = result(first), result(second)
    assert model.calls() == [5]
    assert out1.batch_rows == out2.batch_rows == [5]
    np.testing.assert_array_equal(out1.outputs["y"], expected(early))
    np.testing.assert_array_equal(out2.outputs["y"], expected(late))


def test_withdrawn_announcement_releases_the_wait(make: Make) -> None:
    model = FakeModel()
    b = make(model, max_delay_ms=10_000)
    with b.announced():
        fut = b.submit(rows(2))
    # leaving the block without submitting withdraws the ticket: no 10 s wait
    assert fut.result(timeout=2).errors == {}
    assert model.calls() == [2]


def test_announced_rows_are_waited_for_no_longer_than_the_delay(make: Make) -> None:
    model = FakeModel()
    b = make(model, max_delay_ms=20)
    with b.announced():
        out = b.submit(rows(2)).result(timeout=WAIT)
    assert out.errors == {}
    assert model.calls() == [2]


def test_full_batch_does_not_wait_for_announced_rows(make: Make) -> None:
    model = FakeModel()
    b = make(model, max_batch_rows=4, max_delay_ms=10_000)
    with b.announced():
        out = b.submit(rows(4)).result(timeout=2)
    assert out.batch_rows == [4]


# -- failures --------------------------------------------------------------------------------
def poisoned(n: int, bad: list[int], start: int = 0) -> dict[str, np.ndarray]:
    job = rows(n, start)
    job["x"][bad, 0] = POISON
    return job


def test_failing_rows_are_bisected_out(make: Make) -> None:
    model = FakeModel(poison=POISON)
    b = make(model)
    job = poisoned(8, [2, 5])
    out = result(b.submit(job))
    assert sorted(out.errors) == [2, 5]
    assert all("toy@1" in m and "poisoned row" in m for m in out.errors.values())
    good = [0, 1, 3, 4, 6, 7]
    np.testing.assert_array_equal(out.outputs["y"][good], expected(job)[good])
    np.testing.assert_array_equal(out.outputs["y"][[2, 5]], [0, 0])
    assert out.outputs["x2"].shape == (8, 3)


def test_bisection_keys_errors_by_row_within_each_job(make: Make) -> None:
    b, model = gated(make, poison=POISON)
    clean, dirty, other = rows(3), poisoned(4, [1, 3], start=10), rows(2, start=20)
    futures = [b.submit(j) for j in (clean, dirty, other)]
    model.gate.set()
    out_clean, out_dirty, out_other = (result(f) for f in futures)
    assert model.calls()[1] == 9  # all three shared the first try
    assert out_clean.errors == {} and out_other.errors == {}
    np.testing.assert_array_equal(out_clean.outputs["y"], expected(clean))
    np.testing.assert_array_equal(out_other.outputs["y"], expected(other))
    assert sorted(out_dirty.errors) == [1, 3]
    np.testing.assert_array_equal(out_dirty.outputs["y"][[0, 2]], expected(dirty)[[0, 2]])


@pytest.mark.parametrize("bad", [[6], [4, 5, 6, 7], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
                         ids=["one", "middle-part", "first-part", "all"])
def test_errors_in_a_split_job_keep_their_row_numbers(make: Make, bad: list[int]) -> None:
    b = make(FakeModel(poison=POISON), max_batch_rows=4)
    job = poisoned(10, bad)
    out = result(b.submit(job))
    assert sorted(out.errors) == bad
    good = [i for i in range(10) if i not in bad]
    if good:
        np.testing.assert_array_equal(out.outputs["y"][good], expected(job)[good])
        np.testing.assert_array_equal(out.outputs["y"][bad], np.zeros(len(bad)))
        assert out.outputs["y"].shape == (10,)
    else:
        assert out.outputs is None


def test_wrong_number_of_output_rows_fails_every_row_naming_the_model(make: Make) -> None:
    def short(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"].sum(axis=1)[:-1]}

    b = make(short)
    out = result(b.submit(rows(4)))
    assert out.outputs is None
    assert sorted(out.errors) == [0, 1, 2, 3]
    for message in out.errors.values():
        assert "BatchContractError" in message
        assert "model toy@1 returned 3 rows of 'y' for 4 inputs" in message


def test_a_batch_that_cannot_run_fails_its_futures_instead_of_hanging(make: Make) -> None:
    b, model = gated(make)
    ok = b.submit(rows(1))
    odd = b.submit({"z": np.zeros((1, 3), np.float32)})  # no "x": the merge itself fails
    model.gate.set()
    with pytest.raises(KeyError):
        odd.result(timeout=WAIT)
    with pytest.raises(KeyError):
        ok.result(timeout=WAIT)


# -- contract and lifecycle --------------------------------------------------------------------
@pytest.mark.parametrize(("kw", "word"), [
    ({"max_batch_rows": 0, "max_delay_ms": 5}, "max_batch_rows"),
    ({"max_batch_rows": -3, "max_delay_ms": 5}, "max_batch_rows"),
    ({"max_batch_rows": 8, "max_delay_ms": -1}, "max_delay_ms"),
])
def test_invalid_knobs_are_refused_when_built(kw: dict[str, float], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Batcher(FakeModel(), name="toy@1", **kw)  # type: ignore[arg-type]


def test_inputs_that_disagree_on_rows_are_refused(make: Make) -> None:
    b = make(FakeModel())
    with pytest.raises(ValueError, match="disagree"):
        b.submit({"x": np.zeros((3, 3)), "mask": np.zeros((2, 3))})


def test_submit_before_start_or_after_stop_raises(make: Make) -> None:
    idle = Batcher(FakeModel(), name="toy@1", max_batch_rows=4, max_delay_ms=0)
    with pytest.raises(RuntimeError, match="toy@1"):
        idle.submit(rows(1))
    b = make(FakeModel())
    assert result(b.submit(rows(1))).errors == {}
    b.stop(timeout=WAIT)
    with pytest.raises(RuntimeError, match="not running"):
        b.submit(rows(1))


def test_stop_drains_jobs_already_submitted(make: Make) -> None:
    b, model = gated(make)
    pending = b.submit(rows(2))
    b.stop(timeout=0)  # stop taking new jobs; the batcher thread is still busy on the gate
    with pytest.raises(RuntimeError):
        b.submit(rows(1))
    model.gate.set()
    np.testing.assert_array_equal(result(pending).outputs["y"], expected(rows(2)))
    b.stop(timeout=WAIT)
    assert not b._thread.is_alive()


# -- transient errors -----------------------------------------------------------------------
class OutOfMemory:
    """Raises like a device out of memory for calls over ``fits`` rows, and for the first
    ``flaky`` calls of a single row; ``y = x.sum(axis=1)`` otherwise."""

    def __init__(self, fits: int, flaky: int = 0, message: str = "CUDA out of memory"):
        self.fits, self.flaky, self.message = fits, flaky, message
        self.sizes: list[int] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.sizes.append(len(x))
        if len(x) > self.fits:
            raise RuntimeError(f"{self.message}: tried to allocate {len(x)} rows")
        if len(x) == 1 and self.flaky > 0:
            self.flaky -= 1
            raise RuntimeError(f"{self.message} (transient)")
        return {"y": x.sum(axis=1)}


def test_a_batch_too_big_for_the_device_is_split_until_it_fits(make: Make) -> None:
    model = OutOfMemory(fits=8)
    b = make(model, max_batch_rows=64)
    inputs = rows(32)
    out = result(b.submit(inputs))
    assert out.errors == {}
    np.testing.assert_array_equal(out.outputs["y"], expected(inputs))  # type: ignore[index]
    assert model.sizes[:3] == [32, 16, 8]


def test_a_row_with_a_transient_error_is_retried_then_succeeds(make: Make) -> None:
    model = OutOfMemory(fits=8, flaky=2)
    out = result(make(model, transient_retries=3).submit(rows(1)))
    assert out.errors == {} and model.sizes == [1, 1, 1]


def test_transient_retries_are_bounded(make: Make) -> None:
    model = OutOfMemory(fits=8, flaky=10)
    out = result(make(model, transient_retries=2).submit(rows(1)))
    assert model.sizes == [1, 1, 1]
    assert "out of memory" in out.errors[0]


def test_a_permanent_error_is_not_retried(make: Make) -> None:
    model = OutOfMemory(fits=8, flaky=5, message="bad token id")
    out = result(make(model, transient_retries=3).submit(rows(1)))
    assert model.sizes == [1] and "bad token id" in out.errors[0]


# -- suspect rows (redelivered messages) ----------------------------------------------------
def test_submit_alone_runs_each_row_in_its_own_call_inside_its_guard(make: Make) -> None:
    model = FakeModel()
    b = make(model)
    log: list[str] = []

    @contextlib.contextmanager
    def guard(i: int) -> Iterator[None]:
        log.append(f"enter {i}")
        yield
        log.append(f"exit {i}")

    inputs = rows(4)
    out = result(b.submit_alone(inputs, {2: "dead-lettered"}, guard))
    assert model.calls() == [1, 1, 1]
    assert log == ["enter 0", "exit 0", "enter 1", "exit 1", "enter 3", "exit 3"]
    assert out.errors == {2: "dead-lettered"}
    want = expected(inputs)
    want[2] = 0
    np.testing.assert_array_equal(out.outputs["y"], want)  # type: ignore[index]


def test_suspect_rows_never_share_a_call_with_other_jobs(make: Make) -> None:
    b, model = gated(make)
    alone = b.submit_alone(rows(2, start=10), {}, lambda i: contextlib.nullcontext())
    merged = [b.submit(rows(1, start=20 + i)) for i in range(3)]
    model.gate.set()
    wait([alone, *merged], timeout=WAIT)
    assert result(alone).errors == {}
    assert model.calls() == [1, 1, 1, 3]  # the gate job, two suspect rows alone, then 3


# -- a failed device ------------------------------------------------------------------------
def test_a_lost_device_exits_the_process_without_answering(make: Make, monkeypatch) -> None:
    from workers import batcher as batcher_module
    from workers import device_errors

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)  # the real one never returns

    monkeypatch.setattr(batcher_module.os, "_exit", fake_exit)
    model = OutOfMemory(fits=0, message="CUDA error: an illegal memory access was encountered")
    b = make(model, device_lost=device_errors.is_device_lost)
    with pytest.raises(SystemExit):
        result(b.submit(rows(8)))
    assert exits == [batcher_module.EXIT_DEVICE_LOST] and model.sizes == [8]  # no bisection


def test_out_of_memory_is_not_a_lost_device() -> None:
    from workers.device_errors import is_device_lost

    assert not is_device_lost(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_lost(RuntimeError("CUDA_ERROR_NO_DEVICE: no CUDA-capable device"))


def test_submit_alone_runs_the_rows_named_first_before_the_rest(make: Make) -> None:
    b = make(FakeModel())
    log: list[int] = []

    @contextlib.contextmanager
    def guard(i: int) -> Iterator[None]:
        log.append(i)
        yield

    inputs = rows(5)
    out = result(b.submit_alone(inputs, {}, guard, first=[3, 1, 3, 9]))
    assert log == [3, 1, 0, 2, 4]  # repeats and rows past the end are ignored
    np.testing.assert_array_equal(out.outputs["y"], expected(inputs))  # type: ignore[index]
