"""Shared fixtures: the digits model built once, real-service environments, worker processes.

Real-service fixtures skip when the service is down on a laptop, and fail under CI
(``CI`` set), where .ci/run starts the services.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379"
REDIS_TEST_DB = int(os.environ.get("INFERQ_TEST_REDIS_DB", "12"))
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def service_up(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need(port: int, name: str) -> None:
    if service_up(port):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not reachable on 127.0.0.1:{port} in CI")
    pytest.skip(f"{name} is not running on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.build.digits import build_digits

    root = tmp_path_factory.mktemp("models")
    build_digits(root)
    return root


@pytest.fixture(scope="session")
def bundled_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bundled model and variant, built once per session (as `inferq models build`)."""
    from workers.build.bundled import build_bundled

    root = tmp_path_factory.mktemp("bundled")
    started = time.monotonic()
    build_bundled(root)
    print(f"\nbuilt the bundled models and variants in {time.monotonic() - started:.1f} s")
    return root


@pytest.fixture(scope="session")
def digits(model_repo: Path) -> dict[str, np.ndarray]:
    """10,000 real digit images (the 1,797 tiled) and in-process ORT outputs for them."""
    import onnxruntime as ort

    from workers.build.digits import load_digits_data

    images, labels = load_digits_data()
    reps = -(-10_000 // len(images))
    x = np.concatenate([images] * reps)[:10_000]
    y = np.concatenate([labels] * reps)[:10_000]
    session = ort.InferenceSession(str(model_repo / "digits" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    probs, label = session.run(["probabilities", "label"], {"image": x})
    return {"x": x, "y": y, "probabilities": probs, "label": label}


def _settings_env(broker: str, backend: str, model_repo: Path, home: Path, **extra: str
                  ) -> dict[str, str]:
    env = {
        "INFERQ_BROKER_URL": broker,
        "INFERQ_RESULT_BACKEND": backend,
        "INFERQ_MODEL_REPO": str(model_repo),
        "INFERQ_HOME": str(home),
        "INFERQ_QUEUE_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "INFERQ_RESULT_EXPIRES": "3600",  # what a test leaves in the shared database goes
    }
    env.update(extra)
    return env


def _cleanup(env: dict[str, str]) -> None:
    import redis

    # Only this test's keys: another test session may share the database (never flush it).
    # Queues, wake markers, the transport's records and the API's keys carry the test's
    # queue prefix; Celery's result keys (named by random job ids) expire on their own.
    store = redis.Redis.from_url(env["INFERQ_RESULT_BACKEND"])
    for key in store.scan_iter(match=f"*{env['INFERQ_QUEUE_PREFIX']}*", count=1000):
        store.delete(key)
    if env["INFERQ_BROKER_URL"].startswith("amqp"):
        from kombu import Connection

        with Connection(env["INFERQ_BROKER_URL"]) as conn:
            base = env["INFERQ_QUEUE_PREFIX"] + "infer.digits"
            for name in (base, base + ".high"):
                for op in ("queue_delete", "exchange_delete"):
                    # Already gone is fine (the error also closes that channel).
                    with contextlib.suppress(Exception):
                        getattr(conn.channel(), op)(name)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_env(request: pytest.FixtureRequest, model_repo: Path, tmp_path: Path
               ) -> Iterator[dict[str, str]]:
    """INFERQ_* variables for a real broker (each test its own queues), cleaned up after."""
    need(6379, "Redis")
    backend = f"{REDIS}/{REDIS_TEST_DB}"
    if request.param == "rabbitmq":
        need(5672, "RabbitMQ")
        broker = AMQP
    else:
        broker = backend
    env = _settings_env(broker, backend, model_repo, tmp_path / "home",
                        INFERQ_VISIBILITY_TIMEOUT="8")
    yield env
    _cleanup(env)


@pytest.fixture
def redis_env(model_repo: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    need(6379, "Redis")
    backend = f"{REDIS}/{REDIS_TEST_DB}"
    env = _settings_env(backend, backend, model_repo, tmp_path / "home",
                        INFERQ_VISIBILITY_TIMEOUT="8")
    yield env
    _cleanup(env)


def client_for(env: dict[str, str]):  # noqa: ANN201 - returns producer.client.Client
    from producer.client import Client
    from shared.settings import load_settings

    prefix = "INFERQ_"
    return Client(load_settings(**{k[len(prefix):].lower(): v for k, v in env.items()
                                   if k.startswith(prefix)}))


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL if it takes over 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class WorkerProcess:
    """An ``inferq worker`` subprocess; waits for Celery's ready line, stopped by PID."""

    def __init__(self, env: dict[str, str], log: Path, *args: str):
        self.log = log
        cmd = [sys.executable, "-m", "cli.main", "worker", "--models", "digits",
               "--log-level", "INFO", *args]
        self.handle = log.open("ab")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                     stdout=self.handle, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        seen = self.log.stat().st_size if self.log.exists() else 0
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace")[seen - seen:]:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)  # polling a log file: there is no event to wait on
        raise TimeoutError("worker not ready in time:\n" + self.log.read_text()[-3000:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)
        self.handle.close()


@contextlib.contextmanager
def stopped_after() -> Iterator[list]:
    """A list to put started processes in (anything with ``stop()``); all stopped after."""
    started: list = []
    try:
        yield started
    finally:
        for child in started:
            child.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    with stopped_after() as started:

        def start(env: dict[str, str], *args: str, ready: bool = True) -> WorkerProcess:
            w = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log", *args)
            started.append(w)
            if ready:
                w.wait_ready()
            return w

        yield start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def restartable_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a server a test stops
    and starts again on the same port. A port from ``free_port()`` lies inside that range,
    so while the server is down any outgoing connection made on the machine (the full
    suite makes thousands) may get it as its local port and keep it. The restarted server
    then cannot bind it ("Address already in use": checked here with a connection bound
    to the port), exits, and the test stalls until its timeout, the likely cause of
    ``test_redis_with_aof_restarted_mid_job`` failing now and then under the full suite.
    Below the range, the kernel never hands the port out."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(
            ).split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    # Below the range where there is room, else above it.
    span = (max(1024, low - 10000), low) if low > 3024 else (high + 1, 65536)
    if span[1] - span[0] < 1000:
        raise RuntimeError(f"no port range outside the ephemeral {low}..{high}")
    for _ in range(200):
        port = random.randrange(*span)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {span[0]}..{span[1] - 1}")


class ApiProcess:
    """An ``inferq api`` subprocess on a free port; ready once /healthz answers."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.handle = log.open("ab")
        cmd = [sys.executable, "-m", "cli.main", "api", "--port", str(self.port),
               "--workers", str(workers), "--log-level", "INFO"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                     stdout=self.handle, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)  # a port opening in another process: nothing to wait on
        raise TimeoutError("api not ready in time:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        stop_process(self.proc)
        self.handle.close()


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator:
    """``start_api(env, workers=1)`` -> a running ApiProcess (its url); stopped after the
    test."""
    with stopped_after() as started:

        def start(env: dict[str, str], workers: int = 1) -> ApiProcess:
            api = ApiProcess(env, tmp_path / f"api-{len(started)}.log", workers)
            started.append(api)
            api.wait_ready()
            return api

        yield start


def wait_until(probe: Any, timeout: float, what: str, pause: float = 0.05) -> Any:
    """Poll ``probe`` (state in another process: nothing to wait on) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(pause)
