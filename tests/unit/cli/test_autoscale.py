"""``inferq autoscale`` planning on recorded queue-depth series, and the command it prints.

Series are (seconds, depth) readings as ``observe`` records them; ``done`` on the first and
last reading is how many messages the workers took in between (from ``inspect stats``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from typer.testing import CliRunner

from cli import autoscale
from cli.autoscale import Observation, Plan, Policy, Sample, plan, scale_command
from shared import queues
from shared.errors import ConfigError

POLICY = Policy(target_s=300, min_workers=1, max_workers=8)


def series(depths: Sequence[int], every_s: float = 10.0, taken: int | None = None
           ) -> list[Sample]:
    """Readings ``every_s`` apart; ``taken`` messages taken by the workers over the span."""
    last = len(depths) - 1
    return [Sample(i * every_s, d, 0 if taken is not None and i == 0 else
                   taken if i == last else None) for i, d in enumerate(depths)]


def test_steady_backlog_sizes_for_arrivals_plus_the_backlog() -> None:
    # 500 waiting throughout while 2 workers took 20 msg/s: arrivals match the drain.
    result = plan(series([500] * 5, taken=800), workers=2, policy=POLICY)
    assert result.drain_per_s == pytest.approx(20)
    assert result.per_worker_per_s == pytest.approx(10)
    assert result.arrival_per_s == pytest.approx(20)
    assert math.isinf(result.eta_s or 0)
    # needed 20 + 500 / 300 = 21.7 msg/s = 2.17 workers -> 3
    assert result.desired == 3
    assert any("scale up: 3" in r for r in result.reasons)


def test_growing_backlog_scales_up_for_the_arrivals_and_the_backlog() -> None:
    # +10 msg/s while 1 worker takes 10 msg/s: arrivals are 20 msg/s.
    result = plan(series([100, 200, 300, 400, 500], taken=400), workers=1, policy=POLICY)
    assert result.arrival_per_s == pytest.approx(20)
    assert result.desired == 3  # (20 + 500 / 300) / 10 = 2.17
    assert any("never" in r for r in result.reasons), result.reasons


def test_draining_backlog_scales_down_with_headroom() -> None:
    # -10 msg/s while 3 workers take 15 msg/s: arrivals 5 msg/s, 5 msg/s per worker.
    result = plan(series([1000, 900, 800, 700, 600], taken=600), workers=3, policy=POLICY)
    assert result.arrival_per_s == pytest.approx(5)
    assert result.eta_s == pytest.approx(60)
    # needed 5 + 600 / 300 = 7 msg/s = 1.4 workers, under 70% of 3: down to ceil(1.4 / 0.7)
    assert result.desired == 2


def test_draining_without_worker_counts_uses_the_fall_as_a_lower_bound() -> None:
    result = plan(series([1000, 900, 800, 700, 600]), workers=2, policy=POLICY)
    assert result.drain_per_s == pytest.approx(10)
    assert result.arrival_per_s == 0
    assert any("lower bound" in r for r in result.reasons)
    # needed 0 + 600 / 300 = 2 msg/s = 0.4 workers at 5 msg/s each: ceil(0.4 / 0.7) = 1
    assert result.desired == 1


def test_empty_queue_goes_to_min() -> None:
    assert plan(series([0] * 5), workers=4, policy=POLICY).desired == 1
    assert plan(series([0] * 5, taken=0), workers=4, policy=POLICY).desired == 1
    floor = Policy(target_s=300, min_workers=2, max_workers=8)
    assert plan(series([0] * 5), workers=4, policy=floor).desired == 2


def test_empty_queue_with_traffic_keeps_the_fleet_unless_capacity_is_known() -> None:
    # 4 workers keep up with 8 msg/s; how much spare capacity they have is not measurable.
    busy = series([0] * 5, taken=320)
    kept = plan(busy, workers=4, policy=POLICY)
    assert kept.desired == 4
    assert any("lower bound" in r for r in kept.reasons)
    # Knowing one worker drains 10 msg/s: 0.8 workers needed -> ceil(0.8 / 0.7) = 2.
    assert plan(busy, workers=4, policy=POLICY, rate_per_worker=10).desired == 2


@pytest.mark.parametrize("samples", [
    [Sample(0, 500)],                  # one reading
    [Sample(5, 500), Sample(5, 500)],  # no time between readings
    series([500] * 5),                 # steady, and no worker counts
    series([100, 200, 300]),           # growing, and no worker counts
    series([500] * 5, taken=0),        # the workers took nothing yet
])
def test_no_throughput_data_cannot_estimate(samples) -> None:
    result = plan(samples, workers=2, policy=POLICY)
    assert result.desired is None and not result.estimated
    assert any(r.startswith("cannot estimate") for r in result.reasons), result.reasons


def test_no_throughput_message_says_what_to_do() -> None:
    result = plan(series([500] * 5, taken=0), workers=2, policy=POLICY)
    assert "took no message" in result.reasons[-1]
    assert "--window" in result.reasons[-1]


def test_no_worker_with_a_backlog_starts_one() -> None:
    result = plan(series([50] * 3), workers=0, policy=Policy(min_workers=0, max_workers=4))
    assert result.desired == 1


def test_no_worker_with_a_known_rate_sizes_for_the_arrivals() -> None:
    # Nothing drains, so the growth (+10 msg/s) is the arrival rate; one worker does 4 msg/s.
    result = plan(series([0, 100, 200]), workers=0, policy=POLICY, rate_per_worker=4)
    assert result.arrival_per_s == pytest.approx(10)
    assert result.desired == 3  # (10 + 200 / 300) / 4 = 2.67


def test_clamped_at_max() -> None:
    # 1 worker drains 1 msg/s; 30,000 waiting within 300 s needs 100 + workers.
    result = plan(series([30_000] * 3, taken=20), workers=1, policy=POLICY)
    assert result.desired == 8
    assert any("bounded to 8" in r for r in result.reasons), result.reasons


def test_clamped_at_min_when_scaling_down() -> None:
    result = plan(series([0, 0, 0], taken=2), workers=6,
                  policy=Policy(min_workers=3, max_workers=8), rate_per_worker=10)
    assert result.desired == 3


def test_hysteresis_keeps_the_fleet_when_only_a_little_under() -> None:
    # 5 workers at 10 msg/s each; arrivals 40 msg/s, empty backlog = 4 workers (80% of 5).
    kept = plan(series([0] * 3, taken=800), workers=5, policy=POLICY, rate_per_worker=10)
    assert kept.desired == 5
    assert any("hysteresis" in r for r in kept.reasons)
    # 30 msg/s = 3 workers, well under 70% of 6: down to ceil(3 / 0.7) = 5, not 3.
    down = plan(series([0] * 3, taken=600), workers=6, policy=POLICY, rate_per_worker=10)
    assert down.desired == 5
    # Planned again at the new size with the same load, it stays put (no flapping).
    again = plan(series([0] * 3, taken=600), workers=5, policy=POLICY, rate_per_worker=10)
    assert again.desired == 5


def test_hysteresis_scales_up_at_once() -> None:
    up = plan(series([0] * 3, taken=1040), workers=5, policy=POLICY, rate_per_worker=10)
    assert up.desired == 6  # 52 msg/s = 5.2 workers


@pytest.mark.parametrize("kwargs", [
    {"target_s": 0}, {"min_workers": 5, "max_workers": 2}, {"min_workers": -1},
    {"scale_down_below": 1.0},
])
def test_policy_is_validated(kwargs) -> None:
    with pytest.raises(ConfigError):
        Policy(**kwargs)


def test_scale_command_is_compose_up_in_place() -> None:
    assert scale_command("worker", 3) == [
        "docker", "compose", "up", "-d", "--no-recreate", "--scale", "worker=3", "worker"]


def test_redis_depth_counts_every_priority_list() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    from kombu.transport.redis import Channel

    reader = queues.DepthReader.__new__(queues.DepthReader)
    reader._redis = fakeredis.FakeRedis()
    reader._redis.lpush("p.infer.digits", b"a", b"b")
    reader._redis.lpush(f"p.infer.digits{Channel.sep}3", b"c")
    assert reader.read(["p.infer.digits", "p.infer.minilm"]) == {
        "p.infer.digits": 3, "p.infer.minilm": 0}


# --- the command, with the broker readings replaced --------------------------------------


@pytest.fixture
def cli(monkeypatch):
    from cli.main import app

    monkeypatch.setenv("INFERQ_BROKER_URL", "redis://127.0.0.1:1/0")  # never connected
    monkeypatch.setenv("INFERQ_QUEUE_PREFIX", "")
    seen: dict[str, object] = {}

    def fake_observe(settings, queues, window_s, count, workers, sleep=None):
        seen["queues"], seen["workers"] = queues, workers
        if isinstance(seen["observation"], Exception):
            raise seen["observation"]
        return seen["observation"]

    def fake_run(cmd, check):
        seen["ran"] = cmd
        if seen.get("no_docker"):
            raise FileNotFoundError(2, "No such file or directory", cmd[0])

        class Done:
            returncode = 0

        return Done()

    monkeypatch.setattr(autoscale, "observe", fake_observe)
    monkeypatch.setattr(autoscale.subprocess, "run", fake_run)

    def invoke(observation: Observation | Exception, *args: str):
        seen["observation"] = observation
        return CliRunner().invoke(app, ["autoscale", *args]), seen

    return invoke


def _growing() -> Observation:
    samples = series([100, 200, 300, 400, 500], taken=400)
    return Observation(samples, {"infer.digits": [s.depth for s in samples]}, 1, "test")


def test_cli_dry_run_prints_the_reasoning_and_the_command(cli) -> None:
    result, seen = cli(_growing(), "--models", "digits")
    assert result.exit_code == 0, result.output
    # Every queue of the model: its normal one and its high-priority one.
    assert "infer.digits" in seen["queues"]
    assert all(q.startswith("infer.digits") for q in seen["queues"])
    assert seen["workers"] is None
    assert "queue infer.digits: 100 200 300 400 500" in result.output
    assert "arrival 20.00 msg/s" in result.output
    assert "would run: docker compose up -d --no-recreate --scale worker=3 worker" in \
        result.output
    assert "ran" not in seen


def test_cli_apply_runs_the_command(cli) -> None:
    result, seen = cli(_growing(), "--models", "digits", "--workers", "1", "--apply",
                       "--service", "worker-cpu", "--max", "2")
    assert result.exit_code == 0, result.output
    assert seen["workers"] == 1
    assert seen["ran"] == scale_command("worker-cpu", 2)


def test_cli_apply_without_docker_says_what_to_do(cli) -> None:
    from shared.errors import InferqError

    result, seen = cli(_growing(), "--models", "digits", "--apply")
    assert seen["ran"]  # the first call went through; now without docker:
    seen["no_docker"] = True
    result, seen = cli(_growing(), "--models", "digits", "--apply")
    assert isinstance(result.exception, InferqError)
    assert "by hand" in str(result.exception)


def test_cli_broker_down_names_the_variable(cli) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from shared.errors import InferqError

    result, seen = cli(RedisConnectionError("Error 111 connecting"), "--apply")
    assert isinstance(result.exception, InferqError)
    assert "INFERQ_BROKER_URL" in str(result.exception) and "nothing changed" in \
        str(result.exception)
    assert "ran" not in seen


def test_cli_without_an_estimate_changes_nothing(cli) -> None:
    samples = series([500] * 3)
    result, seen = cli(Observation(samples, {"infer.digits": [500] * 3}, 2, "test"),
                       "--apply")
    assert result.exit_code == autoscale.NO_ESTIMATE_EXIT, result.output
    assert "cannot estimate" in result.output and "nothing changed" in result.output
    assert "ran" not in seen


def test_plan_is_a_plain_value() -> None:
    assert Plan(1, None, 0).estimated is False
