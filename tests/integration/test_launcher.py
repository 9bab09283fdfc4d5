"""``inferq worker --gpus``: a launcher process starts one Celery worker per GPU (a fake
nvidia-smi lists two), pinned by CUDA_VISIBLE_DEVICES, against real Redis; it restarts a
killed child and stops them all on SIGTERM. The parent never loads torch, onnxruntime or
CUDA. Without a CUDA onnxruntime here, the children run on the CPU and log why."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, client_for, free_port, run_cli, stop_process

pytestmark = pytest.mark.integration

TWO_GPUS = "0, Fake GPU A, 1024 MiB\n1, Fake GPU B, 1024 MiB\n"
LOADED_IN_PARENT = ("libcuda", "libcudart", "libnvidia", "libtorch", "onnxruntime")


class Launcher:
    """The ``inferq worker --gpus ...`` parent process, read through its log (its children
    write to the same log)."""

    def __init__(self, env: dict[str, str], log: Path, *args: str):
        self.log = log
        self.handle = log.open("ab")
        cmd = [sys.executable, "-m", "cli.main", "worker", *args]
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        full_env.pop("INFERQ_ORT_THREADS", None)  # let the launcher size it
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.handle,
                                     stderr=subprocess.STDOUT, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, found: Callable[[str], bool], what: str, timeout: float = 90) -> float:
        """Seconds until ``found(log text)``; fails if the launcher exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found(self.text()):
                return time.monotonic() - self.started_at
            if self.proc.poll() is not None:
                pytest.fail(f"launcher exited with {self.proc.returncode} before {what}:\n"
                            + self.text()[-4000:])
            time.sleep(0.1)  # polling a log file: there is no event to wait on
        pytest.fail(f"no {what} within {timeout} s:\n" + self.text()[-4000:])

    def wait_ready(self, label: str, times: int = 1) -> float:
        ready = re.compile(rf"\b{label}@\S+ ready\.")
        return self.wait_for(lambda text: len(ready.findall(text)) >= times,
                             f"{label} ready x{times}")

    def pids(self, label: str) -> list[int]:
        """Every pid the launcher logged for ``label``, oldest first."""
        return [int(p) for p in re.findall(rf"started {label}\b.*? pid (\d+)", self.text())]

    def stop(self) -> None:
        """SIGTERM the parent; if anything it started outlives it, SIGKILL that by pid."""
        stop_process(self.proc)
        self.handle.close()
        for label in ("gpu0", "gpu1", "cpu0", "cpu1"):
            for pid in self.pids(label):
                if _cmdline(pid).startswith(sys.executable) and "cli.main" in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def ping_names(client, prefixes: tuple[str, ...]) -> set[str]:  # noqa: ANN001 - Client
    replies = client.app.control.ping(timeout=2.0)
    return {name for reply in replies for name in reply if name.startswith(prefixes)}


@pytest.fixture
def launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``launch(env, *args)`` -> a Launcher with a fake two-GPU nvidia-smi first on PATH;
    stopped (and anything it started killed) after the test."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{TWO_GPUS}'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    started: list[Launcher] = []

    def start(env: dict[str, str], *args: str) -> Launcher:
        launcher = Launcher(env, tmp_path / f"launcher-{len(started)}.log", *args)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.stop()


def _two_free_ports() -> int:
    """A free port whose next port is free too (the second child's metrics port)."""
    for _ in range(20):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two consecutive free ports")


def submit_and_check(client, digits, n: int, offset: int = 0) -> None:  # noqa: ANN001
    jobs = [client.submit("digits", digits["x"][offset + i]) for i in range(n)]
    for i, job in enumerate(jobs):
        assert int(job.result(timeout=60)["label"][0]) == int(digits["label"][offset + i])


def served_by(fault_log: Path) -> set[int]:
    return {int(line.split()[0]) for line in fault_log.read_text().splitlines() if line}


@pytest.mark.timeout(240)
def test_one_pinned_worker_per_gpu_restarted_and_stopped(redis_env, launch, digits, tmp_path
                                                         ) -> None:
    port = _two_free_ports()
    fault_log = tmp_path / "calls.log"
    # One task thread and 50 ms per model call, so the 20 jobs spread over both workers.
    env = {**redis_env, "INFERQ_METRICS_PORT": str(port),
           "INFERQ_FAULT_INJECTION": "delay_ms=50", "INFERQ_FAULT_LOG": str(fault_log)}
    parent = launch(env, "--gpus", "all", "--models", "digits", "--concurrency", "1")
    startup = max(parent.wait_ready("gpu0"), parent.wait_ready("gpu1"))
    print(f"\nboth GPU workers ready {startup:.1f} s after the launcher started")

    # Each child: pinned to its GPU before it started, GPU 0 inside, own metrics port.
    (pid0,), (pid1,) = parent.pids("gpu0"), parent.pids("gpu1")
    for pid, index, metrics in ((pid0, "0", port), (pid1, "1", port + 1)):
        assert parent_of(pid) == parent.proc.pid
        child_env = environ_of(pid)
        assert child_env["CUDA_VISIBLE_DEVICES"] == index
        assert child_env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert child_env["INFERQ_DEVICE"] == "cuda:0"
        assert child_env["INFERQ_METRICS_PORT"] == str(metrics)
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        loaded = [s.labels for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "inferq_model_loaded" and s.value == 1]
        assert [(x["model"], x["device"]) for x in loaded] == [("digits", "cuda:0")]
    # No CUDA provider in this onnxruntime: each child says so and runs on the CPU.
    assert parent.text().count("device cuda:0 asked for, but this onnxruntime has no CUDA "
                               "provider") == 2

    # The parent: no torch, no onnxruntime, no CUDA library mapped, and it says so.
    assert "loaded here of torch/onnxruntime: none" in parent.text()
    maps = Path(f"/proc/{parent.proc.pid}/maps").read_text()
    assert not [lib for lib in LOADED_IN_PARENT if lib in maps]
    assert any("libonnxruntime" in line or "onnxruntime" in line
               for line in Path(f"/proc/{pid0}/maps").read_text().splitlines())  # the check bites

    client = client_for(redis_env)
    assert {n.split("@")[0] for n in ping_names(client, ("gpu0@", "gpu1@"))} == {"gpu0", "gpu1"}
    submit_and_check(client, digits, 20)
    assert served_by(fault_log) == {pid0, pid1}

    # A child killed outright is restarted (1 s backoff) and serves again.
    killed_at = time.monotonic()
    os.kill(pid0, signal.SIGKILL)
    parent.wait_ready("gpu0", times=2)
    print(f"gpu0 killed -> restarted and ready in {time.monotonic() - killed_at:.1f} s")
    assert re.search(rf"gpu0 \(GPU 0\) pid {pid0} exited with code -9 \(SIGKILL\).*"
                     r"restarting in 1 s", parent.text())
    new0 = parent.pids("gpu0")[-1]
    assert new0 != pid0 and parent_of(new0) == parent.proc.pid
    assert environ_of(new0)["CUDA_VISIBLE_DEVICES"] == "0"
    assert parent.pids("gpu1") == [pid1]  # the other one was left alone
    fault_log.write_text("")
    submit_and_check(client, digits, 20, offset=20)
    assert new0 in served_by(fault_log)

    # SIGTERM the parent: every child gets a warm shutdown; the parent exits 0.
    stopped_at = time.monotonic()
    parent.proc.send_signal(signal.SIGTERM)
    assert parent.proc.wait(timeout=30) == 0
    print(f"SIGTERM -> launcher and both workers gone in {time.monotonic() - stopped_at:.1f} s")
    assert gone(new0) and gone(pid1)
    assert "SIGTERM: sending SIGTERM to 2 worker process(es) (warm shutdown)" in parent.text()
    assert len(re.findall(r"pid \d+ exited with code 0 after .*; not restarted \(stopping\)",
                          parent.text())) == 2


@pytest.mark.timeout(180)
def test_cpu_workers_share_the_cores(redis_env, launch, digits) -> None:
    parent = launch(redis_env, "--gpus", "none", "--processes", "2", "--models", "digits")
    startup = max(parent.wait_ready("cpu0"), parent.wait_ready("cpu1"))
    print(f"\nboth CPU workers ready {startup:.1f} s after the launcher started")
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # 1 on a 2-core box
    for label in ("cpu0", "cpu1"):
        (pid,) = parent.pids(label)
        child_env = environ_of(pid)
        assert child_env["INFERQ_ORT_THREADS"] == threads
        assert child_env["CUDA_VISIBLE_DEVICES"] == ""  # nvidia-smi lists 2; none used
        assert child_env["INFERQ_DEVICE"] == "cpu"
    loaded = re.findall(rf"with \['CPUExecutionProvider'\], {threads} threads", parent.text())
    assert len(loaded) == 2  # each child's ORT session got its share of the cores
    client = client_for(redis_env)
    assert {n.split("@")[0] for n in ping_names(client, ("cpu0@", "cpu1@"))} == {"cpu0", "cpu1"}
    submit_and_check(client, digits, 10)
    # Ctrl-C: passed on as SIGTERM (Celery would exit 1 on SIGINT); warm, exit 0.
    parent.proc.send_signal(signal.SIGINT)
    assert parent.proc.wait(timeout=30) == 0
    assert all(gone(pid) for label in ("cpu0", "cpu1") for pid in parent.pids(label))
    assert "SIGINT: sending SIGTERM to 2 worker process(es) (warm shutdown)" in parent.text()
    assert parent.text().count("exited with code 0") == 2


def test_dry_run_prints_the_plan_and_a_missing_gpu_is_named(launch) -> None:
    env = {"INFERQ_BROKER_URL": "redis://127.0.0.1:6379/0", "INFERQ_METRICS_PORT": "9100"}
    done = run_cli(["worker", "--gpus", "all", "--models", "digits", "--dry-run"], env,
                   timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["gpu0", "gpu1"]
    assert "CUDA_VISIBLE_DEVICES=1" in lines[1] and "INFERQ_METRICS_PORT=9101" in lines[1]
    assert lines[1].endswith("worker --log-level INFO --models digits --hostname gpu1@%h")
    done = run_cli(["worker", "--gpus", "0,5", "--dry-run"], env, timeout=60)
    assert done.returncode == 2
    assert "error: --gpus: GPU 5 is not on this host (nvidia-smi lists: 0, 1)" in done.stderr
