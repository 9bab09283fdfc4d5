"""docker-compose.yml and the Dockerfile agree with each other and with the ``inferq`` CLI,
and Prometheus's config (deploy/prometheus/prometheus.yml) scrapes what compose runs.

The structural checks need only PyYAML. The ``docker-compose config`` checks need the
docker-compose binary (no Docker engine): they skip on a laptop without it and fail in CI,
whose .ci/run installs it. ``promtool check config`` runs where promtool is installed
(Debian's prometheus package) and skips elsewhere: the structure checks stand in for it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
BUCKET_OVERRIDE = ROOT / "deploy" / "compose" / "models-in-bucket.yml"
PASSWORD_VAR = "INFERQ_REDIS_PASSWORD"
PASSWORD_MESSAGE = f"set {PASSWORD_VAR}"
WORKER_SERVICES = ("worker", "worker-cpu")


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))  # as tests/conftest.py reads it


try:
    import yaml
except ImportError:
    if _in_ci():
        raise
    pytest.skip(
        "PyYAML is not installed (it belongs in the test extra: pyyaml)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def _one_shots(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services with restart "no" that another service waits on to complete."""
    awaited = {
        dep
        for svc in services.values()
        for dep, spec in (svc.get("depends_on") or {}).items()
        if isinstance(spec, dict) and spec.get("condition") == "service_completed_successfully"
    }
    return {name for name in awaited if services[name].get("restart") == "no"}


# --- (a) structure ---------------------------------------------------------------------


def test_every_service_has_a_healthcheck_or_is_one_shot(services):
    one_shots = _one_shots(services)
    assert "models" in one_shots
    missing = [
        name
        for name, svc in services.items()
        if name not in one_shots and not (svc.get("healthcheck") or {}).get("test")
    ]
    assert not missing, f"services without a healthcheck: {missing}"


def test_python_healthchecks_compile(services):
    for name, svc in services.items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"<{name} healthcheck>", "exec")


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_workers_scale(services, name):
    svc = services[name]
    assert "container_name" not in svc, "a fixed container_name breaks --scale"
    assert "ports" not in svc, "a published port breaks --scale"
    # The healthcheck pings inferq@<container hostname>: the node name the command sets.
    command = _command(svc)
    assert command[command.index("--hostname") + 1] == "inferq@%h"


def test_worker_reserves_a_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    )
    assert "deploy" not in services["worker-cpu"]


def test_profiles(services):
    assert services["worker-cpu"].get("profiles") == ["cpu"]
    assert services["rabbitmq"].get("profiles") == ["rabbitmq"]
    for name in ("redis", "models", "worker", "flower"):
        assert "profiles" not in services[name], f"{name} must start by default"


def test_redis_is_durable_private_and_needs_a_password(services):
    redis = services["redis"]
    cmd = " ".join(_command(redis))
    assert "--appendonly yes" in cmd
    assert re.search(r"--requirepass \$\{" + PASSWORD_VAR + r":\?", cmd), cmd
    assert "ports" not in redis, "Redis must not be published on the host"
    assert any(str(v).startswith("redis-data:") for v in redis.get("volumes", []))


def test_every_use_of_the_redis_password_is_required():
    text = COMPOSE_FILE.read_text()
    uses = re.findall(r"\$\{" + PASSWORD_VAR + r"([^}]*)\}", text)
    assert uses
    assert all(use.startswith(":?") for use in uses), uses


def test_depends_on_waits_for_health_or_completion(services):
    one_shots = _one_shots(services)
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: depends_on as a list waits for nothing"
        for dep, spec in deps.items():
            want = "service_completed_successfully" if dep in one_shots else "service_healthy"
            assert spec.get("condition") == want, f"{name} -> {dep}: {spec}"
    for name in WORKER_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["models"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_models_volume_is_shared(compose, services):
    assert {"models", "redis-data"} <= set(compose.get("volumes") or {})
    assert "models:/app/models" in services["models"]["volumes"]
    for name in WORKER_SERVICES:
        assert any(v.startswith("models:/app/models") for v in services[name]["volumes"])


def test_build_targets_are_dockerfile_stages(services):
    stages = re.findall(
        r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE | re.IGNORECASE
    )
    assert stages[-1] == "worker", "the worker image must be the default (last) stage"
    assert "client" in stages
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, dict) and "target" in build:
            assert build["target"] in stages, f"{name}: no stage {build['target']!r}"


# --- (a2) Prometheus scrapes the API and every worker replica ------------------------------


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    data = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert isinstance(data, dict) and isinstance(data.get("scrape_configs"), list)
    return data


def _scrape_jobs(prometheus: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [job["job_name"] for job in prometheus["scrape_configs"]]
    assert len(names) == len(set(names)), f"duplicate job_name: {names}"
    return {job["job_name"]: job for job in prometheus["scrape_configs"]}


def _dns_sd(job: dict[str, Any]) -> dict[str, int]:
    """{name: port} of a job's DNS service discovery."""
    found = {}
    for sd in job.get("dns_sd_configs") or []:
        assert sd.get("type", "SRV") == "A", "A records: compose gives no SRV records"
        for name in sd["names"]:
            found[name] = sd["port"]
    return found


def test_prometheus_service_mounts_the_config(services):
    prom = services["prometheus"]
    assert str(prom["image"]).startswith("prom/prometheus")
    assert "profiles" not in prom, "prometheus must start by default"
    assert "container_name" not in prom
    mount = next(str(v) for v in prom["volumes"]
                 if str(v).startswith("./deploy/prometheus/prometheus.yml:"))
    assert f"--config.file={mount.split(':')[1]}" in _command(prom)
    assert all(str(p).startswith("127.0.0.1:") for p in prom.get("ports", [])), \
        "Prometheus is unauthenticated: publish it on loopback only"


def test_prometheus_config_structure(prometheus):
    assert re.fullmatch(r"\d+[smh]", prometheus["global"]["scrape_interval"])
    for name, job in _scrape_jobs(prometheus).items():
        kinds = [k for k in ("static_configs", "dns_sd_configs") if job.get(k)]
        assert len(kinds) == 1, f"{name}: one way of finding targets, got {kinds}"
        assert str(job.get("metrics_path", "/metrics")).startswith("/")
        for port in _dns_sd(job).values():
            assert isinstance(port, int) and 0 < port < 65536


def test_prometheus_scrapes_every_worker_replica(services, prometheus):
    worker = _scrape_jobs(prometheus)["inferq-worker"]
    assert "static_configs" not in worker, "a fixed list misses scaled replicas"
    found = _dns_sd(worker)
    assert {"worker", "tasks.worker"} <= set(found)
    for name in WORKER_SERVICES:
        port = int(services[name]["environment"]["INFERQ_METRICS_PORT"])
        assert found[name] == port, f"{name}: scraped on {found[name]}, serves on {port}"


def test_prometheus_scrapes_the_api(services, prometheus):
    api = _scrape_jobs(prometheus)["inferq-api"]
    command = _command(services["api"])
    assert _dns_sd(api) == {"api": int(command[command.index("--port") + 1])}
    assert api.get("metrics_path", "/metrics") == "/metrics"


def test_promtool_accepts_the_prometheus_config():
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus); structure "
                    "checked above")
    result = subprocess.run([exe, "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- (b) docker-compose accepts the file ----------------------------------------------


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        message = "docker-compose is not on PATH (apt-get install docker-compose)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return exe


def _config(env: dict[str, str], *overrides: Path) -> subprocess.CompletedProcess[str]:
    files = [arg for path in (COMPOSE_FILE, *overrides) for arg in ("-f", str(path))]
    return subprocess.run(
        [_docker_compose(), *files, "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _env(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != PASSWORD_VAR and not k.startswith(("RABBITMQ_", "COMPOSE_"))
    }
    env.update(values)
    return env


def test_docker_compose_config_accepts_the_file():
    result = _config(
        _env(**{PASSWORD_VAR: "x", "RABBITMQ_DEFAULT_USER": "u", "RABBITMQ_DEFAULT_PASS": "p"})
    )
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_does_not_need_rabbitmq_credentials():
    result = _config(_env(**{PASSWORD_VAR: "x"}))
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_requires_the_redis_password():
    result = _config(_env(RABBITMQ_DEFAULT_USER="u", RABBITMQ_DEFAULT_PASS="p"))
    assert result.returncode != 0
    assert PASSWORD_MESSAGE in result.stderr, result.stderr


def test_the_models_in_a_bucket_variant_merges_onto_the_file():
    """deploy/compose/models-in-bucket.yml: workers and the build read the bucket (their
    volume is only a cache), the API reads the model catalog; every variable it sets is a
    setting or a standard AWS one."""
    from shared.settings import ENV_PREFIX, Settings

    result = _config(_env(**{PASSWORD_VAR: "x", "INFERQ_MODEL_BUCKET": "s3://b/models"}),
                     BUCKET_OVERRIDE)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    settings = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for name in ("models", *WORKER_SERVICES):
        env = merged[name]["environment"]
        assert env["INFERQ_MODEL_REPO"] == "s3://b/models"
        assert env["INFERQ_MODEL_CACHE"] == "/app/models"
        assert all(k in settings or k.startswith(("AWS_", "OTEL_")) for k in env), env
    assert merged["worker"]["environment"]["INFERQ_BROKER_URL"].startswith("redis://")
    assert merged["api"]["environment"]["INFERQ_MODEL_SOURCE"] == "store"
    missing = _config(_env(**{PASSWORD_VAR: "x"}), BUCKET_OVERRIDE)
    assert missing.returncode != 0 and "set INFERQ_MODEL_BUCKET" in missing.stderr


# --- (c) commands are real inferq sub-commands ------------------------------------------


@pytest.mark.parametrize("name", ["models", "api", *WORKER_SERVICES])
def test_service_command_is_an_inferq_subcommand(services, name):
    cmd = _command(services[name])
    if name in WORKER_SERVICES:
        assert cmd[0] == "worker"
    # Click rejects an unknown sub-command or option even with --help (exit 2).
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", *cmd, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
