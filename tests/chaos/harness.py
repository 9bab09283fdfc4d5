"""What the chaos tests share: worker settings with faults, the digits rows, checking a
bulk job's results row by row, and counting rows run more than once.

"Rows executed more than once" is counted from ``INFERQ_FAULT_LOG`` (workers/faults.py):
every worker appends ``<pid> <rows>`` after each model call that returned, so the sum
is every row execution, in every worker, killed ones included (a worker's own counters,
``inferq_stats``, die with it). Executions beyond one per answered row are the rows run
again. A worker SIGKILLed between a call's return and its log write under-counts by that
one call: a window of microseconds against the calls' 40+ ms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from producer.bulk.chunks import ChunkResult
from tests.chaos.report import Row
from tests.conftest import wait_until

STALL_S = 60.0  # longest wait for the next chunk's result before a test gives up


def broker_name(env: dict[str, str]) -> str:
    return "rabbitmq" if env["INFERQ_BROKER_URL"].startswith("amqp") else "redis"


def worker_env(env: dict[str, str], log: Path, faults: str = "") -> dict[str, str]:
    """``env`` for a worker that logs its model calls to ``log``, with ``faults``."""
    return {**env, "INFERQ_FAULT_INJECTION": faults, "INFERQ_FAULT_LOG": str(log)}


def tiled(digits: dict[str, np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` digit images (the fixture's 10,000 repeated) and their in-process labels."""
    reps = -(-rows // len(digits["x"]))
    return (np.concatenate([digits["x"]] * reps)[:rows],
            np.concatenate([digits["label"]] * reps)[:rows])


def executions(log: Path) -> int:
    """Rows run by every model call that returned, in every worker that logged."""
    if not log.exists():
        return 0
    return sum(int(line.split()[1]) for line in log.read_text().splitlines() if line)


def collect_during(fault: Background, results: Iterable[ChunkResult],
                   on_part: Callable[[int], None]) -> list[ChunkResult]:
    """``collect`` while ``on_part`` starts ``fault``; then the fault's end. When the
    collecting fails (a stall) and the fault itself failed (a server that did not come
    back), the fault's error is raised: it is the cause, the stall only its symptom."""
    try:
        parts = collect(results, on_part)
    except BaseException:
        fault.wait(10)  # a fault still at work may yet fail: give it a moment
        if fault.error is not None:
            raise fault.error  # noqa: B904 - the stall stays attached as its context
        raise
    fault.join()
    return parts


def collect(results: Iterable[ChunkResult], on_part: Callable[[int], None] | None = None
            ) -> list[ChunkResult]:
    """Every chunk's result; ``on_part(n)`` after the n-th (to inject a fault there)."""
    parts = []
    for part in results:
        parts.append(part)
        if on_part is not None:
            on_part(len(parts))
    return parts


def settle(row: Row, parts: list[ChunkResult], rows: int, log: Path, fault_over: float | None,
           expected_errors: int = 0) -> np.ndarray:
    """Fill in ``row`` from a bulk job's results; -> the rows that were answered, in order.

    A row is lost when it has no result, or an error beyond the ``expected_errors``.
    """
    if fault_over is not None:
        row.recovery_s = time.monotonic() - fault_over
    answered = np.concatenate([np.arange(p.start, p.start + p.rows) for p in parts]) \
        if parts else np.zeros(0, np.int64)
    ok = int(sum(int(p.ok.sum()) for p in parts))
    row.lost = rows - ok - expected_errors
    row.twice = executions(log) - ok
    if row.lost:
        row.recovery_s = None  # it never recovered
    return answered


def assert_every_row_once(parts: list[ChunkResult], answered: np.ndarray,
                          labels: np.ndarray) -> None:
    """Each input row has exactly one result, in order, a success with the in-process
    model's label."""
    np.testing.assert_array_equal(answered, np.arange(len(labels)))
    errors = {r: m for p in parts for r, m in p.errors.items()}
    assert not errors, f"{len(errors)} rows failed, e.g. {next(iter(errors.items()))}"
    assert all(p.ok.all() for p in parts)
    np.testing.assert_array_equal(np.concatenate([p.outputs["label"] for p in parts]), labels)


def _lines(log: Path, pid: int) -> list[str]:
    if not log.exists():
        return []
    prefix = f"{pid} "
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)]


def calls(log: Path, pid: int) -> int:
    """Model calls that returned in process ``pid`` so far."""
    return len(_lines(log, pid))


def rows_run(log: Path, pid: int) -> int:
    """Rows run by the model calls that returned in process ``pid`` so far."""
    return sum(int(line.split()[1]) for line in _lines(log, pid))


def await_next_call(log: Path, pid: int, timeout: float = 10.0) -> None:
    """Until process ``pid`` finishes one more model call: then it is inside the next."""
    seen = calls(log, pid)
    wait_until(lambda: calls(log, pid) != seen, timeout, f"worker {pid} making a model call",
               pause=0.005)


class Background:
    """A fault run on its own thread while the test collects results; ``start()`` when
    the job is far enough along, ``join()`` re-raises what it raised."""

    def __init__(self, fault: Callable[[], None]):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fault,), daemon=True)

    def _run(self, fault: Callable[[], None]) -> None:
        try:
            fault()
        except BaseException as exc:  # handed to the test's thread by join()
            self.error = exc

    def start(self) -> None:
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the fault to end, raising nothing."""
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def join(self, timeout: float = 60.0) -> None:
        if self._thread.ident is None:
            return
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the fault thread did not finish"
        if self.error is not None:
            raise self.error


class Submitter:
    """Threads submitting one-row jobs (``client.submit``) at a steady pace until stopped:
    which job id each row got, and what each failed submit raised."""

    def __init__(self, client, x: np.ndarray, threads: int = 4, every_s: float = 0.02):
        self.client = client
        self.x = x
        self.every_s = every_s
        self.jobs: dict[str, int] = {}  # job id -> row
        self.failed: list[tuple[int, BaseException]] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i, self._next = self._next, self._next + 1
            if i >= len(self.x):
                return
            try:
                job = self.client.submit("digits", self.x[i])
                with self._lock:
                    self.jobs[job.id] = i
            except Exception as exc:  # noqa: BLE001 - what a failed submit raised is checked
                with self._lock:
                    self.failed.append((i, exc))
            self._stop.wait(self.every_s)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a submit hung"


def await_results(client, job_ids: list[str], timeout: float) -> dict[str, dict]:
    """Every job's final record, or what is there when ``timeout`` runs out."""
    from shared.results import is_final

    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(job_ids) and time.monotonic() < deadline:
        todo = [j for j in job_ids if j not in final]
        for first in range(0, len(todo), 256):
            ids = todo[first:first + 256]
            for job_id, meta in zip(ids, client.store.fetch_many(ids), strict=True):
                if is_final(meta):
                    final[job_id] = meta
        if len(final) < len(job_ids):
            time.sleep(0.1)  # results of other processes: polled, bounded by the deadline
    return final


def job_problems(jobs: dict[str, int], final: dict[str, dict], labels: np.ndarray
                 ) -> list[str]:
    """One line per one-row job without a successful result equal to the in-process
    model's (``jobs``: job id -> row; ``final``: the records ``await_results`` found)."""
    problems = []
    for job_id, i in jobs.items():
        meta = final.get(job_id)
        if meta is None:
            problems.append(f"job {job_id} (row {i}): no result")
        elif meta.get("status") != "SUCCESS":
            problems.append(f"job {job_id} (row {i}): {meta.get('status')} {meta.get('result')!r}")
        elif int(meta["result"]["outputs"]["label"][0]) != labels[i]:
            problems.append(f"job {job_id} (row {i}): label differs from the in-process model")
    return problems


def settle_jobs(row: Row, jobs: dict[str, int], final: dict[str, dict], labels: np.ndarray,
                log: Path, fault_over: float | None) -> list[str]:
    """Fill in ``row`` from one-row jobs' records; -> ``job_problems``."""
    if fault_over is not None:
        row.recovery_s = time.monotonic() - fault_over
    problems = job_problems(jobs, final, labels)
    row.lost = len(problems)
    row.twice = executions(log) - (len(jobs) - len(problems))
    if row.lost:
        row.recovery_s = None  # it never recovered
    return problems
