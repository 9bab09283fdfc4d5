"""No broker or result-store password leaves the process: not in a worker's log or its
``/metrics``, not in errors a ``Client`` user sees, not in the API's answers, log or
``/metrics``, not in what the ``inferq`` CLI prints, before or after Redis goes away.

Each test owns a password-protected ``redis-server`` on a free loopback port (the password
a fresh random string, so finding it anywhere is proof of a leak), stopped by PID.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shared.settings import load_settings, scrub
from tests.conftest import client_for, free_port, run_cli, stop_process, wait_until

pytestmark = pytest.mark.integration


# -- a Redis of the test's own -----------------------------------------------------------------
class PasswordRedis:
    """``redis-server --requirepass`` on a free loopback port, no persistence; by PID."""

    def __init__(self, log: Path):
        self.password = "pw-" + uuid.uuid4().hex
        self.port = free_port()
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--requirepass", self.password, "--save", "", "--appendonly", "no"],
                stdout=out, stderr=subprocess.STDOUT)
        probe = redis.Redis(port=self.port, password=self.password, socket_timeout=1)
        try:
            wait_until(lambda: self._up(probe), 15, f"redis-server on port {self.port}")
        finally:
            probe.close()

    def _up(self, probe: Any) -> bool:
        import redis

        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        with contextlib.suppress(redis.ConnectionError):
            return bool(probe.ping())
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed in CI")
        pytest.skip("redis-server is not installed")
    server = PasswordRedis(tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(own_redis: PasswordRedis, model_repo: Path, tmp_path: Path) -> dict[str, str]:
    """INFERQ_* for a broker and result store that are the password-protected Redis."""
    return {"INFERQ_BROKER_URL": own_redis.url, "INFERQ_RESULT_BACKEND": own_redis.url,
            "INFERQ_MODEL_REPO": str(model_repo), "INFERQ_HOME": str(tmp_path / "home"),
            "INFERQ_QUEUE_PREFIX": f"s{uuid.uuid4().hex[:10]}."}


def assert_clean(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text, f"the password is in:\n{text[:3000]}"


def explain(exc: BaseException) -> str:
    """All a user could print of an exception: str, repr, the traceback and its chain."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


# -- scrubbing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, clean", [
    ("redis://:hunter2@cache:6379/0 refused", "redis://:***@cache:6379/0 refused"),
    ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
    ("from rediss://u:p4ss@a/1 to redis://:x@b/2", "from rediss://u:***@a/1 to redis://:***@b/2"),
    ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://host/0?db=1&password=hunter2", "redis://host/0?db=1&password=***"),
    ("REDIS://:Hunter2@H/0", "REDIS://:***@H/0"),
    ("redis://cache:6379/0 has no password", "redis://cache:6379/0 has no password"),
    ("redis://user@host/0 and mail a@b", "redis://user@host/0 and mail a@b"),
])
def test_scrub_masks_every_url_password(text: str, clean: str) -> None:
    assert scrub(text) == clean


def test_settings_never_print_their_secrets() -> None:
    s = load_settings(broker_url="redis://:pw-broker@h:1/0", result_backend="redis://u:pw-store@h/1",
                      api_keys="acme:pw-key", callback_secret="pw-callback")
    for text in (repr(s), str(s), f"{s!r}"):
        assert "pw-" not in text, text
        assert "redis://:***@h:1/0" in text and "api_keys='***'" in text
    assert s.broker_url == "redis://:pw-broker@h:1/0"  # the value itself is untouched


# -- the worker ---------------------------------------------------------------------------------
def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


@pytest.mark.timeout(120)
def test_worker_log_and_metrics_never_show_the_password(env, own_redis, start_worker,
                                                        digits) -> None:
    port = free_port()
    worker = start_worker({**env, "INFERQ_METRICS_PORT": str(port)})
    job = client_for(env).submit("digits", digits["x"][0])
    assert job.result(timeout=30)["label"].tolist() == digits["label"][:1].tolist()
    before = scrape(port)
    assert "inferq_jobs_total" in before

    own_redis.stop()
    wait_until(lambda: "Cannot connect to" in worker.log.read_text(errors="replace"), 30,
             "the worker logging that the broker is gone")
    after = scrape(port)
    worker.stop()

    log = worker.log.read_text(errors="replace")
    assert "redis://:**@127.0.0.1" in log  # the URL is printed, masked (control)
    assert_clean(own_redis.password, log, before, after)


# -- the Python client ------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_client_errors_never_show_the_password(env, own_redis, digits) -> None:
    import redis
    from kombu.exceptions import OperationalError

    from shared.errors import InferqError

    client = client_for(env)
    row = digits["x"][0]
    assert_clean(own_redis.password, repr(client.settings), str(client.settings))
    own_redis.stop()
    calls: dict[str, Callable[[], Any]] = {
        "get": lambda: client.get("no-such-job"),
        "wait": lambda: client.wait("no-such-job", timeout=1),
        "cancel": lambda: client.cancel("no-such-job"),
        "submit": lambda: client.submit("digits", row),
    }  # submit_many is left out: Celery's result consumer retries it for ~20 s first
    for name, call in calls.items():
        with pytest.raises((redis.RedisError, OperationalError, InferqError, TimeoutError,
                            OSError)) as info:
            call()
        assert_clean(own_redis.password, explain(info.value))
        assert name and str(info.value)


# -- the results API --------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def serve(env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    from api.app import create_app

    values = {k[len("INFERQ_"):].lower(): v for k, v in env.items()}
    app = create_app(load_settings(**values, api_keys="acme:key-a"), callbacks=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://inferq.test",
            headers={"Authorization": "Bearer key-a"}, timeout=30) as client:
        yield client


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_api_answers_log_and_metrics_never_show_the_password(
        env, own_redis, digits, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    row = digits["x"][0].tolist()
    answers: list[httpx.Response] = []
    async with serve(env) as api:

        async def every_route(job_id: str) -> None:
            for method, path, body in [
                    ("POST", "/v1/models/digits/jobs", {"inputs": row}),
                    ("GET", f"/v1/jobs/{job_id}", None),
                    ("GET", f"/v1/jobs/{job_id}?wait=200ms", None),
                    ("DELETE", f"/v1/jobs/{job_id}", None),
                    ("POST", "/v1/batches", {"model": "digits", "rows": [row]}),
                    ("GET", "/v1/models", None), ("GET", "/v1/models/digits", None),
                    ("GET", "/readyz", None), ("GET", "/healthz", None),
                    ("GET", "/metrics", None), ("GET", "/openapi.json", None)]:
                answers.append(await api.request(method, path, json=body))

        r = await api.post("/v1/models/digits/jobs", json={"inputs": row})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        await every_route(job_id)
        own_redis.stop()
        await every_route(job_id)

    down = answers[len(answers) // 2:]
    assert {r.status_code for r in down} >= {503}, [r.status_code for r in down]
    assert "result store error" in caplog.text  # the outage was logged (control)
    for r in answers:
        assert r.status_code < 500 or r.status_code == 503, r.text
        assert_clean(own_redis.password, r.text, str(r.headers))
    assert_clean(own_redis.password, caplog.text,
                 "\n".join(explain(rec.exc_info[1]) for rec in caplog.records
                           if rec.exc_info and rec.exc_info[1]))


# -- the CLI ------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cli_output_never_shows_the_password(env, own_redis, tmp_path) -> None:
    """Commands that print settings-derived output or errors, with Redis up and then down
    (each phase's commands run side by side; ``score`` only while Redis is up: with it
    down, publishing retries for over 20 s before the error)."""
    src = tmp_path / "x.npy"
    np.save(src, np.zeros((3, 1, 8, 8), np.float32))
    commands = {
        "status": ["status", "no-such-job"],
        "models": ["models", "list"],
        "autoscale": ["autoscale", "--models", "digits", "--workers", "1", "--window", "0.2",
                      "--samples", "2"],
        "score": ["score", "--model", "digits", "-i", str(src), "-o", str(tmp_path / "y.csv"),
                  "--no-progress", "--stall-timeout", "2"],  # no worker: it stalls, and says so
    }
    up = run_side_by_side(commands, env)
    own_redis.stop()
    down = run_side_by_side({k: v for k, v in commands.items() if k != "score"}, env)
    for proc in [*up.values(), *down.values()]:
        assert_clean(own_redis.password, proc.stdout, proc.stderr)
    assert up["status"].returncode == 2  # JobNotFound: a clean one-line error
    assert "no job 'no-such-job'" in up["status"].stderr
    assert up["score"].returncode != 0 and "is a worker consuming" in up["score"].stderr
    assert down["status"].returncode != 0 and down["autoscale"].returncode != 0


def run_side_by_side(commands: dict[str, list[str]], env: dict[str, str]
                     ) -> dict[str, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(len(commands)) as pool:
        running = {name: pool.submit(run_cli, args, env, 60) for name, args in commands.items()}
        return {name: future.result() for name, future in running.items()}


@pytest.mark.timeout(180)
def test_demo_output_never_shows_the_password(env, own_redis, start_worker) -> None:
    start_worker(env)
    proc = run_cli(["demo"], env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 1,797 digits" in proc.stdout
    assert_clean(own_redis.password, proc.stdout, proc.stderr)
