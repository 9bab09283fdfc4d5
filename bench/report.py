"""Rows of results, their ratios and targets, the printed table and the JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import describe

MODES = ("limit", "naive-bulk", "naive-online", "bulk", "online", "async", "http", "worker-rss",
         "producer-rss")
RSS_TARGET_MB = 300.0


@dataclass
class Target:
    text: str
    ok: bool


@dataclass
class Row:
    mode: str  # one of MODES
    model: str  # the reference every mode of this model uses, e.g. digits:fp32
    rows: int | None = None
    seconds: float | None = None
    rows_per_s: float | None = None
    concurrency: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mb: float | None = None
    ratio_limit: float | None = None
    ratio_naive: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model.split(":")[0]

    @property
    def label(self) -> str:
        return f"{self.mode} C={self.concurrency}" if self.concurrency else self.mode


def _find(rows: list[Row], name: str, mode: str, c: int | None = None) -> Row | None:
    return next((r for r in rows if r.name == name and r.mode == mode
                 and (c is None or r.concurrency == c)), None)


def apply_ratios(rows: list[Row]) -> None:
    """rows/s as a fraction of the limit and a multiple of the naive bulk rate."""
    for row in rows:
        limit, naive = _find(rows, row.name, "limit"), _find(rows, row.name, "naive-bulk")
        if row.rows_per_s is None or row.mode in ("limit", "producer-rss"):
            continue
        if limit and limit.rows_per_s:
            row.ratio_limit = row.rows_per_s / limit.rows_per_s
        if naive and naive.rows_per_s:
            row.ratio_naive = row.rows_per_s / naive.rows_per_s


def _check(row: Row | None, text: str, value: float | None, ok_if: bool | None) -> None:
    if row is not None and value is not None and ok_if is not None:
        row.targets.append(Target(text, ok_if))


def apply_targets(rows: list[Row]) -> None:
    """The issue's targets, judged on this run's figures."""
    bulk = _find(rows, "digits", "bulk")
    if bulk and bulk.rows_per_s is not None:
        _check(bulk, ">=150,000 rows/s", bulk.rows_per_s, bulk.rows_per_s >= 150_000)
        _check(bulk, ">=0.8 x limit", bulk.ratio_limit,
               bulk.ratio_limit is not None and bulk.ratio_limit >= 0.8)
    bulk = _find(rows, "minilm", "bulk")
    if bulk:
        _check(bulk, ">=0.9 x limit", bulk.ratio_limit,
               bulk.ratio_limit is not None and bulk.ratio_limit >= 0.9)
    online = _find(rows, "minilm", "online", 64)
    if online:
        _check(online, ">=0.8 x limit", online.ratio_limit,
               online.ratio_limit is not None and online.ratio_limit >= 0.8)
    online = _find(rows, "digits", "online", 64)
    if online:
        _check(online, ">=3 x naive", online.ratio_naive,
               online.ratio_naive is not None and online.ratio_naive >= 3)
    for name in ("digits", "minilm"):
        one, naive = _find(rows, name, "online", 1), _find(rows, name, "naive-online", 1)
        if one and naive and one.p50_ms is not None and naive.p50_ms:
            ratio = one.p50_ms / naive.p50_ms
            one.extra["p50_vs_naive_p50"] = round(ratio, 3)
            _check(one, f"p50 <=1.2 x naive p50 ({ratio:.2f})", ratio, ratio <= 1.2)
    _http_targets(rows)
    rss = _find(rows, "digits", "producer-rss")
    if rss and rss.rss_mb is not None:
        note = "" if rss.rows == 1_000_000 else f" (on {rss.rows:,} rows; target is 1M)"
        _check(rss, f"<={RSS_TARGET_MB:.0f} MB{note}", rss.rss_mb, rss.rss_mb <= RSS_TARGET_MB)


def _http_targets(rows: list[Row]) -> None:
    """Issue 15's: the HTTP path against the model and against its own CPU."""
    http = _find(rows, "digits", "http", 64)
    if http and http.rows_per_s is not None:
        _check(http, ">=700 jobs/s", http.rows_per_s, http.rows_per_s >= 700)
    http = _find(rows, "digits", "http", 1)
    if http and http.p50_ms is not None:
        _check(http, "p50 <=4 ms", http.p50_ms, http.p50_ms <= 4)
    http = _find(rows, "minilm", "http", 64)
    if http:
        _check(http, ">=0.7 x limit", http.ratio_limit,
               http.ratio_limit is not None and http.ratio_limit >= 0.7)
    for name in ("digits", "minilm"):
        http = _find(rows, name, "http", 64)
        cpu = None if http is None else http.extra.get("api_cpu_ms_per_request")
        if cpu is not None:
            _check(http, f"API CPU <=1.5 ms/request ({cpu:.2f})", cpu, cpu <= 1.5)


def _fmt(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


COLUMNS = ("mode", "model", "rows", "rows/s", "x limit", "x naive", "p50 ms", "p99 ms",
           "RSS MB", "cpu cores", "targets")


def _cells(row: Row) -> list[str]:
    targets = "; ".join(f"{'PASS' if t.ok else 'MISS'} {t.text}" for t in row.targets)
    return [row.label, row.model, _fmt(row.rows, ","), _fmt(row.rows_per_s, ",.0f"),
            _fmt(row.ratio_limit, ".3g"), _fmt(row.ratio_naive, ".3g"),
            _fmt(row.p50_ms, ".2f"), _fmt(row.p99_ms, ".2f"), _fmt(row.rss_mb, ".0f"),
            describe(row.cpu), targets]


def table(rows: list[Row]) -> str:
    cells = [list(COLUMNS), *[_cells(r) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    left = {0, 1, 9, 10}
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    results = []
    for row in rows:
        data = asdict(row)
        data["label"] = row.label
        results.append(data)
    targets = [{"model": r.model, "mode": r.label, "target": t.text, "ok": t.ok}
               for r in rows for t in r.targets]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results, "targets": targets},
                               indent=2, default=str) + "\n")
