"""The chaos summary: one row per test, printed as one table at the end of the run.

Columns: the fault injected, the broker, jobs (job ids the producer got back), rows,
lost rows (rows with no result, or an error the fault did not call for), rows executed
more than once (row executions beyond one per answered row, counted from the workers'
model-call log, ``INFERQ_FAULT_LOG``), and the recovery time: seconds from the end of
the last fault (a kill, or the service coming back) until every row had its result ("-"
when rows were lost, or the fault has no end, as a poison row). A last column says how
the test ended.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADERS = ("fault injected", "broker", "jobs", "rows", "lost rows",
           "rows executed more than once", "recovery time (s)", "outcome")


@dataclass
class Row:
    fault: str
    broker: str
    jobs: int = 0
    rows: int = 0
    lost: int | None = None
    twice: int | None = None
    recovery_s: float | None = None
    outcome: str = "unfinished"
    note: str = ""  # what else happened, e.g. a worker that had to be restarted

    def cells(self) -> tuple[str, ...]:
        def show(value: object) -> str:
            if value is None:
                return "-"
            return f"{value:.1f}" if isinstance(value, float) else str(value)

        return (self.fault, self.broker, show(self.jobs), show(self.rows), show(self.lost),
                show(self.twice), show(self.recovery_s),
                f"{self.outcome} ({self.note})" if self.note else self.outcome)


def table(rows: list[Row]) -> list[str]:
    cells = [HEADERS, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    numeric = {2, 3, 4, 5, 6}

    def line(values: tuple[str, ...]) -> str:
        return " | ".join(v.rjust(w) if i in numeric else v.ljust(w)
                          for i, (v, w) in enumerate(zip(values, widths, strict=True)))

    rule = "-+-".join("-" * w for w in widths)
    return [line(HEADERS), rule, *(line(c) for c in cells[1:])]
