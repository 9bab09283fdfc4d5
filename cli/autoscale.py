"""``inferq autoscale``: how many workers would drain the model queues' backlog in time.

:func:`plan` is pure: it turns a recorded queue-depth series (plus, where the workers
report it, how many messages they took) into a worker count with its reasoning, so it is
tested without a broker. :func:`observe` records that series from the broker and the
workers; :func:`command` is the CLI, a dry run unless ``--apply``.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.errors import ConfigError, InferqError
from shared.settings import Settings, load_settings

if TYPE_CHECKING:
    from shared.queues import DepthReader

NO_ESTIMATE_EXIT = 3  # the exit status when there is no estimate; nothing is changed
INSPECT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Sample:
    """One reading at ``t`` seconds (monotonic): ``depth`` messages waiting and, where the
    workers report it, ``done``: messages they have taken since the first reading."""

    t: float
    depth: int
    done: int | None = None


@dataclass(frozen=True)
class Policy:
    target_s: float = 300.0
    min_workers: int = 1
    max_workers: int = 8
    # Scale down only when the fleet needs at most this share of its current size, and then
    # keep this much headroom, so the next reading does not scale straight back up.
    scale_down_below: float = 0.7

    def __post_init__(self) -> None:
        if not self.target_s > 0:
            raise ConfigError("--target: must be over 0 seconds")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ConfigError(f"--min {self.min_workers} / --max {self.max_workers}: "
                              "need 0 <= min <= max")
        if not 0 < self.scale_down_below < 1:
            raise ConfigError("scale_down_below: must be between 0 and 1")

    def clamp(self, n: int) -> int:
        return max(self.min_workers, min(self.max_workers, n))


@dataclass(frozen=True)
class Plan:
    """``desired`` is None when there is no estimate; ``reasons`` say how it was reached."""

    workers: int
    desired: int | None
    depth: int
    arrival_per_s: float | None = None
    drain_per_s: float | None = None
    per_worker_per_s: float | None = None
    eta_s: float | None = None  # at the current fleet; inf when the backlog is not shrinking
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def estimated(self) -> bool:
        return self.desired is not None


def _slope(samples: Sequence[Sample]) -> float:
    """Least-squares change of the depth, messages per second (+ growing)."""
    n = len(samples)
    mean_t = sum(s.t for s in samples) / n
    mean_d = sum(s.depth for s in samples) / n
    var = sum((s.t - mean_t) ** 2 for s in samples)
    return sum((s.t - mean_t) * (s.depth - mean_d) for s in samples) / var


def _drain(samples: Sequence[Sample], net: float) -> tuple[float | None, str | None]:
    """Messages per second the whole fleet takes, and a note when it is only a bound."""
    counted = [s for s in samples if s.done is not None]
    if len(counted) >= 2 and counted[-1].t > counted[0].t:
        taken = max(0, (counted[-1].done or 0) - (counted[0].done or 0))
        return taken / (counted[-1].t - counted[0].t), None
    if net < 0:
        return -net, ("no count of messages taken: drain rate is how fast the depth fell, "
                      "arrivals taken as 0 (a lower bound)")
    return None, None


def plan(samples: Sequence[Sample], workers: int, policy: Policy,
         rate_per_worker: float | None = None) -> Plan:
    """Workers needed to take every arrival and drain the backlog within the target.

    Needed rate = arrival + depth / target; workers = that / (one worker's drain rate),
    measured over the window (or ``rate_per_worker`` when given), bounded by the policy.
    """
    if len(samples) < 2 or samples[-1].t <= samples[0].t:
        return Plan(workers, None, samples[-1].depth if samples else 0,
                    reasons=("cannot estimate: need two depth readings some time apart",))
    depth, span = samples[-1].depth, samples[-1].t - samples[0].t
    net = _slope(samples)
    reasons = [f"depth {samples[0].depth:,} -> {depth:,} messages over {span:.1f} s "
               f"({net:+,.2f} msg/s)"]
    drain, note = _drain(samples, net)
    if note:
        reasons.append(note)
    if all(s.depth == 0 for s in samples) and not drain:
        return Plan(workers, policy.min_workers, 0, 0.0, drain, eta_s=0.0,
                    reasons=(*reasons, "queue empty and nothing taken: nothing to drain, "
                             f"min {policy.min_workers}"))
    if workers == 0 and rate_per_worker is not None:  # nothing drains: the growth is arrivals
        return _size(0, depth, max(0.0, net), 0.0, rate_per_worker, policy, reasons,
                     rate_from="--rate-per-worker")
    if workers == 0:
        want = policy.clamp(max(1, policy.min_workers))
        return Plan(0, want, depth, reasons=(
            *reasons, f"no worker serves these queues: start {want} to measure throughput"))
    if not drain and rate_per_worker is None:
        why = (f"{workers} worker(s) took no message in the window (still loading models, "
               "or stuck?)" if drain == 0 else "the depth is not falling and no worker "
               "reported how many messages it took")
        return Plan(workers, None, depth, reasons=(
            *reasons, f"cannot estimate the drain rate: {why}; sample again with a longer "
            "--window (without --workers, so workers are asked), or pass --rate-per-worker"))
    drain = drain or 0.0
    arrival = max(0.0, drain + net)
    if rate_per_worker is not None:
        return _size(workers, depth, arrival, drain, rate_per_worker, policy, reasons,
                     rate_from="--rate-per-worker")
    return _size(workers, depth, arrival, drain, drain / workers, policy, reasons,
                 lower_bound=min(s.depth for s in samples) == 0)


def _size(workers: int, depth: int, arrival: float, drain: float, per_worker: float,
          policy: Policy, reasons: list[str], lower_bound: bool = False,
          rate_from: str = "measured") -> Plan:
    net_drain = drain - arrival
    eta = 0.0 if depth == 0 else depth / net_drain if net_drain > 0 else math.inf
    reasons.append(f"arrival {arrival:,.2f} msg/s, drain {drain:,.2f} msg/s by {workers} "
                   f"worker(s); {per_worker:,.2f} msg/s per worker ({rate_from})")
    if lower_bound:
        reasons.append("the queue ran empty: workers were not busy all the time, so the "
                       "per-worker rate is a lower bound")
    reasons.append(f"ETA at {workers} worker(s): " + (
        "never (the backlog is not shrinking)" if math.isinf(eta) else f"{eta:,.0f} s"))
    need = arrival + depth / policy.target_s
    exact = need / per_worker if per_worker > 0 else math.inf
    reasons.append(f"needed: {arrival:,.2f} + {depth:,} / {policy.target_s:g} s = "
                   f"{need:,.2f} msg/s = {exact:,.2f} workers")
    if exact > workers:
        want = workers if math.isinf(exact) else math.ceil(exact - 1e-9)
        why = "scale up"
    elif exact <= workers * policy.scale_down_below:
        want = math.ceil(exact / policy.scale_down_below - 1e-9)
        why = f"well under (<= {policy.scale_down_below:.0%} of {workers}): scale down"
    else:
        want, why = workers, (f"within {policy.scale_down_below:.0%}-100% of {workers}: keep "
                              "(hysteresis)")
    desired = policy.clamp(want)
    bound = f", bounded to {desired} by --min/--max" if desired != want else ""
    reasons.append(f"{why}: {want}{bound}")
    return Plan(workers, desired, depth, arrival, drain, per_worker, eta, tuple(reasons))


def scale_command(service: str, n: int) -> list[str]:
    """The Compose command that sets the worker service to ``n`` replicas in place."""
    return ["docker", "compose", "up", "-d", "--no-recreate", "--scale", f"{service}={n}",
            service]


# --- reading the broker and the workers --------------------------------------------------


def serving_workers(app: Any, prefix: str, queues: Sequence[str] | None
                    ) -> tuple[list[str], list[str]]:
    """Live workers consuming any of ``queues`` (``inspect active_queues``), and the queues;
    with ``queues`` None, every model queue a live worker consumes."""
    from shared.celery_app import require_broadcasts

    require_broadcasts(app, "finding the workers that serve a queue")
    active: dict[str, list[dict[str, Any]]] = (
        app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {})
    if queues is None:
        served = {q.get("name", "") for qs in active.values() for q in qs or []}
        queues = sorted(q for q in served
                        if q.startswith(f"{prefix}infer.") and q != f"{prefix}infer.default")
    wanted = set(queues)
    return ([w for w, qs in active.items() if any(q.get("name") in wanted for q in qs or [])],
            list(queues))


def tasks_taken(app: Any, workers: Sequence[str]) -> dict[str, int]:
    """Tasks each worker has taken since it started (``inspect stats``, every task name:
    one task is one message). ``limit`` makes it return as soon as all have answered."""
    if not workers:
        return {}
    stats = app.control.inspect(list(workers), timeout=INSPECT_TIMEOUT_S,
                                limit=len(workers)).stats() or {}
    return {w: sum(reply.get("total", {}).values()) for w, reply in stats.items()}


@dataclass
class Observation:
    samples: list[Sample]
    per_queue: dict[str, list[int]]
    workers: int
    source: str


def observe(settings: Settings, queues: list[str] | None, window_s: float, count: int,
            workers: int | None, sleep: Callable[[float], None] = time.sleep) -> Observation:
    """``count`` depth readings spread over ``window_s`` seconds. Unless ``workers`` is given,
    the workers are asked who serves the queues and, beside the first and last reading, how
    many messages they have taken; with ``queues`` None, the queues are those they serve,
    else the repository's models'."""
    if settings.embedded or not settings.broker_url:
        raise ConfigError("INFERQ_BROKER_URL: autoscale reads a broker's queues; set it "
                          "(redis://… or amqp://…)")
    from shared.celery_app import make_app
    from shared.queues import DepthReader, model_queue_names

    app: Any = None
    serving: list[str] = []
    if workers is None:
        app = make_app(settings)
        serving, queues = serving_workers(app, settings.queue_prefix, queues)
    if not queues:
        queues = model_queue_names(settings, _models_in_repo(settings))
    if not queues:
        raise InferqError("no model queues found (no live worker serves one and the model "
                          "repository is empty): pass --models NAME[,NAME]")
    counts = (lambda: tasks_taken(app, serving)) if app is not None and serving else None
    reader = DepthReader(settings.broker_url)
    try:
        samples, per_queue = _read_series(reader, queues, window_s, count, sleep, counts)
    finally:
        reader.close()
    if app is None:
        return Observation(samples, per_queue, workers or 0, "--workers")
    now, _ = serving_workers(app, settings.queue_prefix, queues)
    return Observation(samples, per_queue, len(now), "live workers (celery inspect)")


def _read_series(reader: DepthReader, queues: list[str], window_s: float, count: int,
                 sleep: Callable[[float], None],
                 counts: Callable[[], dict[str, int]] | None
                 ) -> tuple[list[Sample], dict[str, list[int]]]:
    """Depth readings; the workers' counts are read just before the first and just after
    the last, so both series cover the same span."""
    before = counts() if counts else {}
    samples: list[Sample] = []
    per_queue: dict[str, list[int]] = {q: [] for q in queues}
    for i in range(count):
        if i:
            sleep(window_s / (count - 1))
        depths = reader.read(queues)
        for q, d in depths.items():
            per_queue[q].append(d)
        samples.append(Sample(time.monotonic(), sum(depths.values()), 0 if counts else None))
    if counts:
        after = counts()
        # A count lower than before: that worker restarted; all of its count is new.
        taken = sum(n - before.get(w, 0) if n >= before.get(w, 0) else n
                    for w, n in after.items())
        last = samples[-1]
        samples[1:] = [Sample(s.t, s.depth) for s in samples[1:-1]]
        samples.append(Sample(last.t, last.depth, taken))
    return samples, per_queue


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return OperationalError, RedisConnectionError, RedisTimeoutError, OSError


def _models_in_repo(settings: Settings) -> list[str]:
    from shared.catalog import open_for_clients

    try:
        return open_for_clients(settings).names()
    except (OSError, InferqError):
        return []


# --- the command ----------------------------------------------------------------------


def command(
    models: Annotated[str | None, typer.Option(
        help="comma list; default: the queues live workers consume, else the repository's")]
    = None,
    window: Annotated[float, typer.Option(min=0.1, help="seconds to watch the queues")] = 30.0,
    samples: Annotated[int, typer.Option(min=2, help="depth readings over the window")] = 5,
    target: Annotated[float, typer.Option(help="drain the backlog within this many seconds")]
    = 300.0,
    min_workers: Annotated[int, typer.Option("--min", min=0, help="fewest workers")] = 1,
    max_workers: Annotated[int, typer.Option("--max", min=0, help="most workers")] = 8,
    workers: Annotated[int | None, typer.Option(
        min=0, help="workers running now; default: ask them (celery inspect)")] = None,
    rate_per_worker: Annotated[float | None, typer.Option(
        min=0.001, help="messages/s one worker drains, if known; default: measured")] = None,
    service: Annotated[str, typer.Option(help="the Compose service to scale")] = "worker",
    apply: Annotated[bool, typer.Option("--apply/--dry-run", help="run the docker compose "
                                        "command instead of only printing it")] = False,
) -> None:
    """Print how many workers drain the model queues within --target seconds, and why."""
    policy = Policy(target, min_workers, max_workers)
    settings = load_settings()
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    from shared.queues import model_queue_names  # kombu only here: `inferq --help` stays light

    queues = model_queue_names(settings, names) or None
    try:
        seen = observe(settings, queues, window, samples, workers)
    except _broker_errors() as exc:
        raise InferqError(f"INFERQ_BROKER_URL: the broker is unreachable ({type(exc).__name__}:"
                          f" {exc}); nothing changed") from None
    result = plan(seen.samples, seen.workers, policy, rate_per_worker)
    for q, depths in seen.per_queue.items():
        typer.echo(f"queue {q}: " + " ".join(f"{d:,}" for d in depths))
    typer.echo(f"workers: {seen.workers} ({seen.source})")
    for line in result.reasons:
        typer.echo(f"  {line}")
    if result.desired is None:
        typer.echo(f"no estimate: keep {seen.workers} worker(s); nothing changed")
        raise typer.Exit(NO_ESTIMATE_EXIT)
    cmd = scale_command(service, result.desired)
    typer.echo(f"plan: {result.desired} worker(s) (now {seen.workers})")
    if result.desired == seen.workers:
        typer.echo("no change")
        return
    if not apply:
        typer.echo("would run: " + shlex.join(cmd))
        return
    typer.echo("running: " + shlex.join(cmd))
    try:
        done = subprocess.run(cmd, check=False)
    except OSError as exc:
        raise InferqError(f"could not run {cmd[0]} ({exc}); run the command above by hand, "
                          "from the folder of docker-compose.yml") from None
    raise typer.Exit(done.returncode)
