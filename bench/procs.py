"""Worker subprocesses (started here, stopped by PID) and what /proc says about them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.config import ROOT

_TICK = os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM = peak RSS), None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text.rsplit(")", 1)[1].split()  # the name may hold spaces; fields follow ')'
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class WorkerProcess:
    """A worker subprocess that logs Celery's `` ready.`` line once it consumes."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name = name
        self.log = log
        self._handle = log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._handle,
                                     stderr=subprocess.STDOUT, cwd=ROOT)

    @classmethod
    def inferq(cls, model: str, env: dict[str, str], log: Path) -> WorkerProcess:
        cmd = [sys.executable, "-m", "cli.main", "worker", "--models", model,
               "--log-level", "INFO"]
        return cls(f"inferq worker ({model})", cmd, env, log)

    @classmethod
    def naive(cls, env: dict[str, str], log: Path) -> WorkerProcess:
        # What a user would start: threads pool, 4 threads, one message reserved per thread.
        cmd = [sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "-P", "threads",
               "-c", "4", "--prefetch-multiplier", "1", "--without-mingle", "--without-gossip",
               "--loglevel", "INFO"]
        return cls("naive celery worker", cmd, env, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.tail())
            time.sleep(0.1)  # polling a log file: there is no event to wait on
        raise TimeoutError(f"{self.name} not ready in {timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def peak_rss_mb(self) -> float | None:
        kb = proc_status_kb(self.pid, "VmHWM")
        return None if kb is None else kb / 1024

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Celery's warm shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._handle.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (an API's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += proc_cpu_seconds(current)
        todo.extend(children.get(current, []))
    return total


class ApiProcess:
    """``inferq api --workers N`` on a free port, ready once /healthz answers."""

    def __init__(self, env: dict[str, str], log: Path, workers: int):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._handle = log.open("ab")
        cmd = [sys.executable, "-m", "cli.main", "api", "--port", str(self.port),
               "--workers", str(workers), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._handle,
                                     stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"inferq api exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # no event to wait on: the server is another process
        raise TimeoutError(f"inferq api not ready in {timeout} s")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._handle.close()

    def __enter__(self) -> ApiProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
