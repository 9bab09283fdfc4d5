"""Chaos fixtures: a row of the summary table per test, test-owned Redis servers, the
workers' model-call log; and the hook that prints the table at the end of the run."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.chaos.redis_server import RedisServer
from tests.chaos.report import Row, table
from tests.conftest import need

ROWS = pytest.StashKey[list[Row]]()
ROW = pytest.StashKey[Row]()


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> Callable[[str, str], Row]:
    """``chaos_report(fault, broker)`` -> this test's row of the summary; fill it in."""

    def add(fault: str, broker: str) -> Row:
        row = Row(fault, broker)
        request.config.stash.setdefault(ROWS, []).append(row)
        request.node.stash[ROW] = row
        return row

    return add


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Each row says how its test ended (a failed teardown overrides a pass)."""
    report = yield
    row = item.stash.get(ROW, None)
    if row is None or (report.when != "call" and report.passed):
        return report
    if hasattr(report, "wasxfail"):
        row.outcome = "xfail" if report.skipped else "XPASS"
    elif row.outcome in ("unfinished", "passed"):
        row.outcome = report.outcome if report.when == "call" else f"{report.when} error"
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = terminalreporter.config.stash.get(ROWS, [])
    if not rows:
        return
    terminalreporter.section("chaos summary")
    for line in table(rows):
        terminalreporter.write_line(line)


@pytest.fixture
def fault_log(tmp_path: Path) -> Path:
    """Where workers started with ``INFERQ_FAULT_LOG`` log their model calls."""
    return tmp_path / "model-calls.log"


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``start_redis(aof=True)`` -> a running test-owned Redis; stopped after the test."""
    need(6379, "Redis")  # the same rule as the other real-service fixtures
    servers: list[RedisServer] = []

    def start(aof: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", aof=aof)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
