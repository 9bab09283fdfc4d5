"""deploy/ agrees with the code: Kubernetes manifests run real ``inferq`` commands with real
settings, KEDA scales Deployments that exist on queues that exist, and the Grafana dashboard
queries only metrics (and labels) that the worker and the API export.

``promtool`` checks the dashboard's PromQL where it is installed (Debian's prometheus
package) and skips elsewhere; the structural checks stand in for it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer.main
import yaml

from cli.main import app as cli_app
from shared.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "inferq.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DOCS = [ROOT / "docs" / "ops.md", K8S / "README.md"]
KINDS = {
    ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "Secret"),
    ("v1", "PersistentVolumeClaim"), ("batch/v1", "Job"),
    ("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# --- Kubernetes -------------------------------------------------------------------------


def _docs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
                found.append((path.name, doc))
    return found


DOCS_K8S = _docs()


def _of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS_K8S if doc["kind"] == kind]


def _by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _of(kind)}


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"])
            for doc in _of("Deployment") + _of("Job")]


def _containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{owner}/{c['name']}", c) for owner, spec in _pod_specs()
            for c in spec.get("initContainers", []) + spec["containers"]]


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def _parse_cli(argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """The ``inferq`` sub-command ``argv`` names and its parsed parameters; an unknown
    command or option raises (the CLI's own parser; typer may bundle its own click, so
    groups are told apart by their ``commands``)."""
    assert argv[0] == "inferq", argv
    command: Any = typer.main.get_command(cli_app)
    rest = argv[1:]
    while hasattr(command, "commands"):
        assert rest and rest[0] in command.commands, f"no inferq command {rest[:1]}: {argv}"
        command, rest = command.commands[rest[0]], rest[1:]
    ctx = command.make_context("inferq", list(rest))
    return command, ctx.params


def test_every_manifest_parses_with_kind_and_name() -> None:
    assert {"worker-gpu.yaml", "worker-cpu.yaml", "api.yaml", "keda-redis.yaml"} <= {
        name for name, _ in DOCS_K8S}
    for name, doc in DOCS_K8S:
        assert (doc.get("apiVersion"), doc.get("kind")) in KINDS, f"{name}: {doc.get('kind')}"
        meta = doc.get("metadata") or {}
        assert isinstance(meta.get("name"), str), f"{name}: metadata.name"
        assert DNS_1123.fullmatch(meta["name"]) and len(meta["name"]) <= 63, meta["name"]


def test_names_are_unique_per_kind() -> None:
    # keda-prometheus.yaml replaces keda-redis.yaml's ScaledObject on purpose (same name).
    seen: dict[tuple[str, str], str] = {}
    for file, doc in DOCS_K8S:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in seen and doc["kind"] != "ScaledObject":
            pytest.fail(f"{key} in both {seen[key]} and {file}")
        seen[key] = file


def test_a_deployment_per_worker_pool_and_the_gpu_one_takes_a_gpu() -> None:
    deployments = _by_name("Deployment")
    assert {"inferq-worker-gpu", "inferq-worker-cpu", "inferq-api"} <= set(deployments)
    gpu = deployments["inferq-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in gpu["env"]}["INFERQ_DEVICE"] == "cuda"
    cpu = deployments["inferq-worker-cpu"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in (cpu["resources"].get("limits") or {})


def test_selectors_match_their_pods() -> None:
    for doc in _of("Deployment"):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        wanted = doc["spec"]["selector"]["matchLabels"]
        assert wanted.items() <= labels.items(), doc["metadata"]["name"]
    deployments = _of("Deployment")
    for svc in _of("Service"):
        matched = [d for d in deployments
                   if svc["spec"]["selector"].items()
                   <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"service {svc['metadata']['name']} selects {len(matched)}"
        ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports


@pytest.mark.parametrize("name, container", _containers(),
                         ids=[name for name, _ in _containers()])
def test_container_runs_a_real_inferq_command(name: str, container: dict[str, Any]) -> None:
    argv = _argv(container)
    command, params = _parse_cli(argv)
    if command.name == "worker":
        assert params["hostname"] == "inferq@%h", "the ping probes address inferq@<hostname>"
        assert params["models"], "name the models a pool serves"


def test_probe_scripts_compile() -> None:
    for name, container in _containers():
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            argv = ((container.get(probe) or {}).get("exec") or {}).get("command") or []
            if argv[:2] == ["python", "-c"]:
                compile(argv[2], f"<{name} {probe}>", "exec")


def test_env_vars_are_real_settings() -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    secret = _by_name("Secret")["inferq"]["stringData"]
    for name, container in _containers():
        literal = {}
        for env in container.get("env", []):
            assert env["name"] in fields, f"{name}: {env['name']} is not a setting"
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "inferq" and ref["key"] in secret, f"{name}: {ref}"
            else:
                literal[env["name"][len(ENV_PREFIX):].lower()] = env["value"]
        load_settings(**literal)  # each literal value is valid for its setting


def test_metrics_port_is_the_one_served_and_annotated() -> None:
    for doc in _of("Deployment"):
        template = doc["spec"]["template"]
        notes = template["metadata"].get("annotations") or {}
        container = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if "INFERQ_METRICS_PORT" in env:
            port = int(env["INFERQ_METRICS_PORT"])
            assert int(notes["prometheus.io/port"]) == port
            assert port in {p["containerPort"] for p in container["ports"]}


def test_volumes_claim_the_models_pvc() -> None:
    claims = set(_by_name("PersistentVolumeClaim"))
    for owner, spec in _pod_specs():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, owner


def test_scaled_objects_scale_existing_deployments_on_real_queues() -> None:
    from shared.queues import model_queues

    deployments = _by_name("Deployment")
    auths = set(_by_name("TriggerAuthentication"))
    settings = Settings()
    assert _of("ScaledObject")
    for scaled in _of("ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        assert ref["name"] in deployments, f"no Deployment {ref['name']}"
        assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        container = deployments[ref["name"]]["spec"]["template"]["spec"]["containers"][0]
        _, params = _parse_cli(_argv(container))
        served = [m.strip() for m in params["models"].split(",")]
        queues = {q.name for m in served for q in model_queues(settings, m)}
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            if trigger["type"] == "redis":
                assert meta["listName"] in queues, f"{meta['listName']} not in {queues}"
                assert int(meta["listLength"]) > 0
                assert trigger["authenticationRef"]["name"] in auths
            else:
                assert trigger["type"] == "prometheus"
                assert "inferq_queue_depth" in meta["query"]
                assert any(f'model="{m}"' in meta["query"] for m in served)
                assert float(meta["threshold"]) > 0


def test_both_keda_triggers_are_offered() -> None:
    types = {t["type"] for s in _of("ScaledObject") for t in s["spec"]["triggers"]}
    assert types == {"redis", "prometheus"}


def test_kustomization_lists_existing_files_and_one_scaled_object() -> None:
    (kustomization,) = _of("Kustomization")
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in resources, "secrets are created, not committed"
    assert sum(r.startswith("keda-") for r in resources) == 1


# --- Grafana ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """{sample name: label names} scraped from the worker's and the API's registries, with
    every metric observed once so each labelled series shows."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from api.metrics import ApiMetrics
    from workers.metrics import WorkerMetrics

    worker = WorkerMetrics("cpu")
    manifest: Any = SimpleNamespace(name="digits", version=1, variant="fp32")
    worker.model_loaded(manifest)
    worker.batch(manifest, 8, 0.01)
    worker.job("digits", "succeeded", 1.0, 2.0)
    api = ApiMetrics(lambda: {"digits": 3})
    api.requests.labels("GET", "/v1/jobs/{job_id}", "200").inc()
    api.request_seconds.labels("GET", "/v1/jobs/{job_id}").observe(0.01)
    api.finished("digits", "succeeded", 0.2)
    api.callbacks.labels("delivered").inc()
    names: dict[str, set[str]] = {}
    for registry in (worker.registry, api.registry):
        text = generate_latest(registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_structure(dashboard) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uses_only_exported_metrics(dashboard, exported) -> None:
    used = {name for expr in _exprs(dashboard)
            for name in re.findall(r"\b(inferq_[A-Za-z0-9_]+)", expr)}
    unknown = used - set(exported)
    assert not unknown, f"not exported by workers/metrics.py or api/metrics.py: " \
        f"{sorted(unknown)}"
    assert {"inferq_queue_depth", "inferq_batch_rows_sum", "inferq_batch_rows_bucket",
            "inferq_inference_seconds_bucket", "inferq_queue_wait_seconds_bucket",
            "inferq_jobs_total", "inferq_model_loaded", "inferq_api_requests_total"} <= used


def test_dashboard_uses_only_real_labels(dashboard, exported) -> None:
    scrape_labels = {"job", "instance", "service"}
    every = set().union(*exported.values()) | scrape_labels
    for expr in _exprs(dashboard):
        for metric, inside in re.findall(r"\b(inferq_[A-Za-z0-9_]+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", inside))
            known = exported.get(metric, set()) | scrape_labels
            assert labels <= known, f"{metric}: {labels - known}"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",") if g.strip()}
            assert labels <= every, f"{expr}: {labels - every}"


def test_dashboard_job_variables_are_the_prometheus_jobs(dashboard) -> None:
    jobs = {job["job_name"] for job in
            yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("worker_job", "api_job"):
        assert variables[name]["query"] in jobs, name


def test_promtool_accepts_the_dashboard_queries(dashboard, tmp_path: Path) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus)")
    values = {"$__rate_interval": "1m", "$worker_job": "inferq-worker",
              "$api_job": "inferq-api", "$model": ".*"}
    rules = []
    for i, expr in enumerate(_exprs(dashboard)):
        if expr.startswith("label_values("):
            continue  # Grafana's, not PromQL
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"inferq:dashboard_check_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([exe, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- docs ---------------------------------------------------------------------------------


def _documented_commands() -> list[str]:
    lines = []
    for doc in DOCS:
        in_code = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            elif in_code and line.strip().startswith("inferq "):
                lines.append(line.strip().split("  #")[0].split(" #")[0])
    return lines


def test_documented_inferq_commands_parse() -> None:
    commands = _documented_commands()
    assert any(c.startswith("inferq autoscale") for c in commands)
    for line in commands:
        _parse_cli(shlex.split(line))


# --- the models-in-a-bucket overlay (deploy/k8s-bucket) ----------------------------------


def _rendered_bucket_overlay() -> list[dict[str, Any]]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not on PATH (its built-in kustomize renders the overlay)")
    proc = subprocess.run([exe, "kustomize", str(ROOT / "deploy" / "k8s-bucket")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_bucket_overlay_needs_no_shared_volume() -> None:
    docs = _rendered_bucket_overlay()
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    load_settings(model_repo=config["INFERQ_MODEL_REPO"], home="/tmp")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "Job")}
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert all("persistentVolumeClaim" not in v for v in volumes.values()), name
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert all(k in fields or k.startswith("AWS_") for k in env), (name, env)
            if name == "inferq-api":
                assert env["INFERQ_MODEL_SOURCE"]["value"] == "store"
                assert not container.get("volumeMounts") and not volumes
                continue
            ref = env["INFERQ_MODEL_REPO"]["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == next(d for d in docs if d["kind"] == "ConfigMap")[
                "metadata"]["name"]
            mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
            assert mount["mountPath"] == env["INFERQ_MODEL_CACHE"]["value"]
            assert not mount.get("readOnly") and "emptyDir" in volumes["models"]
    assert {"inferq-worker-gpu", "inferq-worker-cpu", "inferq-models-build",
            "inferq-api"} <= pods.keys()


def test_the_images_copy_every_package_the_wheel_installs() -> None:
    """The console script (cli.main) and every layer must be in the image: setuptools
    builds a wheel without a package it does not find, and `inferq` then fails to start."""
    import tomllib

    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", (ROOT / "Dockerfile").read_text(), re.M))
    assert {w.rstrip("*") for w in wanted} <= copied, copied
