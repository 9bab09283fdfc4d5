"""``inferq top``: a live view of the model queues, the workers and the dead letters.

:func:`snapshot` reads everything once, through the callables of :class:`Sources` (so it
is tested with fakes); :func:`render` turns a snapshot into a rich table; :func:`command`
is the CLI, refreshing every ``--interval`` seconds, or printing one frame with ``--once``.
Rates (rows/s, mean batch, busy) compare a snapshot with the one before it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

from shared.errors import ConfigError, InferqError
from shared.settings import Settings, load_settings, scrub

CONTROL_TIMEOUT_S = 1.0  # how long workers get to answer ping and inferq_stats
Stats = dict[str, dict[str, float]]  # one worker's inferq_stats: model@version -> counters


@dataclass
class Sources:
    """Where a snapshot reads: queue depths by queue name, the names of live workers,
    their ``inferq_stats`` replies, and (count, newest entry) of the dead letters."""

    depths: Callable[[Sequence[str]], dict[str, int]]
    ping: Callable[[], list[str]]
    stats: Callable[[list[str]], dict[str, Stats]]
    dead_letters: Callable[[], tuple[int, dict[str, Any] | None]] | None = None


@dataclass(frozen=True)
class ModelRow:
    model: str
    queues: dict[str, str]  # priority -> queue name
    waiting: dict[str, int | None]  # priority -> messages waiting; None: not read


@dataclass(frozen=True)
class VersionRow:
    """One model version in one worker: lifetime counters and, against the previous
    snapshot, rows/s, the mean rows per model call and the share of time in model calls."""

    worker: str
    key: str  # model@version
    calls: int
    rows: int
    max_rows: int
    seconds: float
    rows_per_s: float | None = None
    mean_batch: float | None = None
    busy: float | None = None

    @property
    def model(self) -> str:
        return self.key.partition("@")[0].partition(":")[0]


@dataclass(frozen=True)
class Snapshot:
    at: float  # wall clock, shown
    t: float  # monotonic, for rates
    models: list[ModelRow]
    workers: list[str]  # answered ping (or inferq_stats)
    versions: list[VersionRow]
    silent: list[str] = field(default_factory=list)  # alive, but no inferq_stats reply
    dead_letters: int | None = None  # None: no Redis result store, or it failed
    newest_dead: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    store: bool = True  # whether there is a result store to read dead letters from

    def model_rate(self, model: str) -> float | None:
        rates = [v.rows_per_s for v in self.versions if v.model == model]
        known = [r for r in rates if r is not None]
        return sum(known) if known else None

    def serving(self, model: str) -> int:
        return len({v.worker for v in self.versions if v.model == model})


def _error(where: str, exc: BaseException) -> str:
    return f"{where}: {type(exc).__name__}: {scrub(str(exc))}"


def _version(worker: str, key: str, stats: dict[str, float], before: VersionRow | None,
             span: float | None) -> VersionRow:
    calls, rows = int(stats.get("calls", 0)), int(stats.get("rows", 0))
    seconds = float(stats.get("seconds", 0.0))
    row = VersionRow(worker, key, calls, rows, int(stats.get("max_rows", 0)), seconds)
    if before is None or not span:
        return row
    if rows < before.rows or calls < before.calls:  # counters reset: the process restarted
        before = VersionRow(worker, key, 0, 0, 0, 0.0)
    d_calls, d_rows = calls - before.calls, rows - before.rows
    return VersionRow(worker, key, calls, rows, row.max_rows, seconds,
                      rows_per_s=d_rows / span,
                      mean_batch=d_rows / d_calls if d_calls else None,
                      busy=min(1.0, max(0.0, (seconds - before.seconds) / span)))


def snapshot(sources: Sources, queues: dict[str, dict[str, str]],
             previous: Snapshot | None = None, clock: Callable[[], float] = time.monotonic
             ) -> Snapshot:
    """Read every source once. ``queues``: model -> priority -> queue name. A source that
    fails leaves its part empty and adds a line to ``errors``; the rest is still read."""
    errors: list[str] = []
    names = [q for by_priority in queues.values() for q in by_priority.values()]
    depths: dict[str, int] = {}
    try:
        depths = sources.depths(names)
    except Exception as exc:  # noqa: BLE001 - shown in the view, not a crash
        errors.append(_error("queue depths (broker)", exc))
    models = [ModelRow(m, dict(qs), {p: depths.get(q) for p, q in qs.items()})
              for m, qs in queues.items()]
    alive: list[str] = []
    replies: dict[str, Stats] = {}
    try:
        alive = sources.ping()
    except Exception as exc:  # noqa: BLE001
        errors.append(_error("workers (control ping)", exc))
    try:
        replies = sources.stats(alive) if alive else {}
    except Exception as exc:  # noqa: BLE001
        errors.append(_error("workers (inferq_stats)", exc))
    t = clock()
    span = None if previous is None else t - previous.t
    before = {} if previous is None else {(v.worker, v.key): v for v in previous.versions}
    versions = [_version(w, key, stats, before.get((w, key)), span)
                for w in sorted(replies) for key, stats in sorted(replies[w].items())]
    count, newest = None, None
    if sources.dead_letters is not None:
        try:
            count, newest = sources.dead_letters()
        except Exception as exc:  # noqa: BLE001
            errors.append(_error("dead letters (result store)", exc))
    return Snapshot(time.time(), t, models, sorted(set(alive) | set(replies)), versions,
                    sorted(set(alive) - set(replies)), count, newest, errors,
                    store=sources.dead_letters is not None)


# --- rendering ----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _models_table(snap: Snapshot) -> Table:
    table = Table("model", Column("queue", overflow="fold"), "waiting", "waiting (high)",
                  "workers", "rows/s", title="queues", title_justify="left")
    for row in snap.models:
        table.add_row(row.model, row.queues.get("normal", ""),
                      _num(row.waiting.get("normal")), _num(row.waiting.get("high")),
                      str(snap.serving(row.model)), _num(snap.model_rate(row.model), 1))
    return table


def _workers_table(snap: Snapshot) -> Table:
    table = Table(Column("worker", overflow="fold"), "model", "calls", "rows", "max batch",
                  "mean batch", "rows/s", "busy", title=f"workers: {len(snap.workers)} alive",
                  title_justify="left")
    for v in snap.versions:
        table.add_row(v.worker, v.key, f"{v.calls:,}", f"{v.rows:,}", f"{v.max_rows:,}",
                      _num(v.mean_batch if v.mean_batch is not None
                           else (v.rows / v.calls if v.calls else None), 1),
                      _num(v.rows_per_s, 1), "-" if v.busy is None else f"{v.busy:.0%}")
    for name in snap.silent:
        table.add_row(name, Text("no inferq_stats reply", style="yellow"), *[""] * 6)
    return table


def _dead_line(snap: Snapshot) -> Text:
    if snap.dead_letters is None:
        return Text("dead letters: - " + ("(not read)" if snap.store
                                          else "(no Redis result store)"), style="dim")
    line = Text(f"dead letters: {snap.dead_letters:,}",
                style="bold red" if snap.dead_letters else "green")
    if snap.newest_dead:
        e = snap.newest_dead
        at = dt.datetime.fromtimestamp(float(e.get("at", 0)), dt.UTC).strftime("%H:%M:%S")
        line.append(f"  newest {at} UTC {e.get('model', '?')}: {e.get('reason', '')}",
                    style="default")
    return line


def render(snap: Snapshot) -> Table:
    """One frame: the queues per model, each worker's model versions, dead letters,
    and what could not be read."""
    at = dt.datetime.fromtimestamp(snap.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    frame = Table.grid(padding=(0, 0))
    frame.add_row(Text(f"inferq top  {at} UTC", style="bold"))
    frame.add_row(_models_table(snap))
    frame.add_row(_workers_table(snap))
    frame.add_row(_dead_line(snap))
    for line in snap.errors:
        frame.add_row(Text(f"error: {line}", style="red"))
    return frame


def as_record(snap: Snapshot) -> dict[str, Any]:
    """A snapshot for ``--json``: every figure, unformatted."""
    return {"at": snap.at,
            "models": [{"model": m.model, "queues": m.queues, "waiting": m.waiting,
                        "workers": snap.serving(m.model), "rows_per_s": snap.model_rate(m.model)}
                       for m in snap.models],
            "workers": snap.workers, "silent_workers": snap.silent,
            "versions": [{"worker": v.worker, "model": v.key, "calls": v.calls, "rows": v.rows,
                          "max_batch": v.max_rows, "mean_batch": v.mean_batch,
                          "rows_per_s": v.rows_per_s, "busy": v.busy} for v in snap.versions],
            "dead_letters": snap.dead_letters, "newest_dead_letter": snap.newest_dead,
            "errors": snap.errors}


# --- the real sources and the command -------------------------------------------------------


def queues_of(settings: Settings, models: Sequence[str]) -> dict[str, dict[str, str]]:
    from shared.queues import PRIORITIES, queue_name

    return {m: {p: queue_name(settings, m, p) for p in PRIORITIES} for m in models}


def stats_of(replies: list[dict[str, Any]] | None) -> dict[str, Stats]:
    """``inferq_stats`` broadcast replies -> worker -> model version -> counters. A worker
    without the command answers ``{"error": ...}``: it is left out (so shown as silent)."""
    found = {name: {k: v for k, v in value.items() if isinstance(v, dict)}
             for reply in replies or [] for name, value in reply.items()
             if isinstance(value, dict)}
    return {name: value for name, value in found.items() if value}


@contextlib.contextmanager
def open_sources(settings: Settings, timeout: float = CONTROL_TIMEOUT_S) -> Iterator[Sources]:
    """The broker (depths, control), and the result store (dead letters) when it is Redis."""
    if settings.embedded or not settings.broker_url:
        raise ConfigError("INFERQ_BROKER_URL: top watches a broker's queues and workers; "
                          "set it (redis://… or amqp://…)")
    from shared import keys
    from shared.celery_app import make_app, require_broadcasts
    from shared.claims import redis_of
    from shared.dead_letters import read_dead_letters
    from shared.queues import DepthReader

    app = make_app(settings)
    reader = DepthReader(settings.broker_url)
    store = redis_of(app.backend)

    def ping() -> list[str]:
        require_broadcasts(app, "inferq top's worker list")
        return [name for reply in app.control.ping(timeout=timeout) or [] for name in reply]

    def stats(workers: list[str]) -> dict[str, Stats]:
        return stats_of(app.control.broadcast("inferq_stats", reply=True, timeout=timeout,
                                              destination=workers, limit=len(workers)))

    def dead() -> tuple[int, dict[str, Any] | None]:
        assert store is not None
        count = int(store.llen(keys.dead_letters(settings.queue_prefix)))
        newest = read_dead_letters(store, settings.queue_prefix, 1) if count else []
        return count, newest[0] if newest else None

    try:
        yield Sources(reader.read, ping, stats, dead if store is not None else None)
    finally:
        reader.close()
        app.close()


def _models(settings: Settings, models: str | None) -> list[str]:
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    if names:
        return names
    from shared.catalog import open_for_clients

    try:
        names = open_for_clients(settings).names()
    except (OSError, InferqError):
        names = []
    if not names:
        raise ConfigError(f"INFERQ_MODEL_REPO: no models in {settings.model_repo}; "
                          "pass --models NAME[,NAME]")
    return names


def command(
    models: Annotated[str | None, typer.Option(
        help="comma list; default: every model in the repository")] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (exit "
                                       "status 1 if a source could not be read)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per refresh "
                                          "(NDJSON), for programs")] = False,
) -> None:
    """Live view: queue depths, workers and their rows/s, dead letters (Ctrl-C quits).
    Piped or with --json, a frame per refresh is appended instead of redrawn."""
    settings = load_settings()
    queues = queues_of(settings, _models(settings, models))
    console = Console()
    if not console.is_terminal:  # a pipe or a file: no 80-column wrapping of names
        console = Console(width=max(console.width, 200))

    def emit(snap: Snapshot) -> None:
        if as_json:
            print(json.dumps(as_record(snap), default=str), flush=True)
        else:
            console.print(render(snap))

    with open_sources(settings) as sources:
        snap = snapshot(sources, queues)
        if once:
            emit(snap)
            raise typer.Exit(1 if snap.errors else 0)
        if as_json or not console.is_terminal:  # no cursor to redraw with: append frames
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    emit(snap)
                    time.sleep(max(0.0, interval - (time.monotonic() - snap.t)))
                    snap = snapshot(sources, queues, snap)
            return
        with Live(render(snap), console=console, auto_refresh=False) as live, \
                contextlib.suppress(KeyboardInterrupt):
            while True:  # a refresh every interval, however long the reading took
                time.sleep(max(0.0, interval - (time.monotonic() - snap.t)))
                snap = snapshot(sources, queues, snap)
                live.update(render(snap), refresh=True)
