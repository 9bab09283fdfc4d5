"""One Celery worker process per GPU (or N CPU worker processes), under a small supervisor.

The launcher never imports torch or onnxruntime and never touches CUDA: it lists GPUs
with ``nvidia-smi`` and starts each worker as a fresh interpreter (``python -m
cli.main worker``) whose environment already holds ``CUDA_VISIBLE_DEVICES``, so the
pin is in place before anything in the child can initialise CUDA (docs/gpu.md).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from shared import backoff
from shared.errors import ConfigError
from shared.settings import Settings

logger = logging.getLogger(__name__)

NVIDIA_SMI = ("nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader")
# Modules whose presence in the launcher would mean CUDA could have been touched here.
HEAVY_MODULES = ("torch", "onnxruntime")
_POLL_S = 0.2  # longest the supervisor sleeps between looks at its children


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str = ""
    memory: str = ""


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader``."""
    gpus = []
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        index, _, rest = line.partition(",")
        name, _, memory = rest.rpartition(",")
        if not re.fullmatch(r"\d+", index.strip(), re.ASCII):
            logger.warning("nvidia-smi: cannot read %r; line skipped", line)
            continue
        gpus.append(Gpu(int(index), name.strip(), memory.strip()))
    return gpus


def list_gpus(timeout: float = 20.0) -> list[Gpu]:
    """The GPUs ``nvidia-smi`` lists; none when it is absent or fails (logged why)."""
    try:
        done = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except FileNotFoundError:
        logger.info("nvidia-smi not found: no GPUs on this host")
        return []
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi failed (%s): treating this host as having no GPUs", exc)
        return []
    if done.returncode != 0:
        logger.warning("nvidia-smi exited with %d (%s): treating this host as having no GPUs",
                       done.returncode, (done.stderr or done.stdout).strip()[:300])
        return []
    return parse_nvidia_smi(done.stdout)


def select_gpus(spec: str, available: Sequence[Gpu]) -> list[Gpu]:
    """The GPUs ``--gpus`` names: ``all``, ``none`` (CPU) or indices such as ``0,2``."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec == "all":
        return list(available)
    by_index = {gpu.index: gpu for gpu in available}
    listed = ", ".join(str(i) for i in by_index) or "none"
    chosen: list[Gpu] = []
    for item in (part.strip() for part in spec.split(",")):
        if not re.fullmatch(r"\d+", item, re.ASCII):
            raise ConfigError(f"--gpus: {item!r} is not a GPU index; use all, none, or "
                              "indices such as 0,2")
        if int(item) not in by_index:
            raise ConfigError(f"--gpus: GPU {item} is not on this host (nvidia-smi lists: "
                              f"{listed})")
        if by_index[int(item)] in chosen:
            raise ConfigError(f"--gpus: GPU {item} is named twice")
        chosen.append(by_index[int(item)])
    return chosen


@dataclass(frozen=True)
class Child:
    """One worker process to run: ``label`` is its node-name prefix and its name in logs."""

    label: str
    gpu: Gpu | None
    argv: tuple[str, ...]
    env: Mapping[str, str]  # set on top of the launcher's own environment

    def describe(self) -> str:
        where = f"GPU {self.gpu.index}" if self.gpu else "CPU"
        if self.gpu and self.gpu.name:
            where += f" ({self.gpu.name}, {self.gpu.memory})"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{self.label} on {where}: {env} {shlex.join(self.argv)}"


def plan(gpus: Sequence[Gpu], *, processes: int, worker_args: Sequence[str],
         environ: Mapping[str, str], cores: int, metrics_port: int = 0,
         host: str = "%h") -> list[Child]:
    """The children to start: one per GPU in ``gpus``, else ``processes`` CPU workers.

    Each child's ONNX Runtime threads are ``cores // children`` unless
    ``INFERQ_ORT_THREADS`` is set, so the processes do not oversubscribe the cores.
    """
    count = len(gpus) or processes
    if count < 1:
        raise ConfigError(f"--processes: at least 1, not {processes}")
    if metrics_port and metrics_port + count - 1 > 65535:
        raise ConfigError(f"INFERQ_METRICS_PORT: {metrics_port} + {count - 1} workers runs "
                          "past port 65535")
    children = []
    for position in range(count):
        gpu = gpus[position] if gpus else None
        env: dict[str, str] = {}
        if gpu is not None:
            label = f"gpu{gpu.index}"
            # nvidia-smi numbers GPUs in PCI bus order; CUDA's default is fastest first.
            env.update(CUDA_VISIBLE_DEVICES=str(gpu.index), CUDA_DEVICE_ORDER="PCI_BUS_ID",
                       INFERQ_DEVICE="cuda:0")
        else:
            label = f"cpu{position}"
            env.update(CUDA_VISIBLE_DEVICES="", INFERQ_DEVICE="cpu")
        if "INFERQ_ORT_THREADS" not in environ:
            env["INFERQ_ORT_THREADS"] = str(max(1, cores // count))
        if metrics_port:
            env["INFERQ_METRICS_PORT"] = str(metrics_port + position)
        # -P: never the working directory first on sys.path (a folder named cli/ there would
        # shadow the installed command line)
        argv = (sys.executable, "-P", "-m", "cli.main", "worker", *worker_args,
                "--hostname", f"{label}@{host}")
        children.append(Child(label, gpu, argv, env))
    return children


def children_for(spec: str, settings: Settings, *, models: str | None = None,
                 concurrency: int | None = None, hostname: str | None = None,
                 processes: int | None = None, log_level: str = "INFO") -> list[Child]:
    """What ``inferq worker --gpus SPEC`` runs: the GPUs from nvidia-smi (never CUDA here),
    the worker options passed on, each child's node name ``gpu<index>@<host>``."""
    gpus = select_gpus(spec, [] if spec.strip().lower() == "none" else list_gpus())
    if gpus and processes is not None:
        logger.warning("--processes %d ignored: it sizes CPU workers; one worker per GPU",
                       processes)
    elif not gpus:
        logger.info("%s: %d CPU worker process(es)", "--gpus none" if spec.strip().lower()
                    == "none" else "no GPU found", processes or 1)
    worker_args = ["--log-level", log_level]
    if models:
        worker_args += ["--models", models]
    if concurrency:
        worker_args += ["--concurrency", str(concurrency)]
    host = hostname.rpartition("@")[2] if hostname else "%h"
    return plan(gpus, processes=processes or 1, worker_args=worker_args, environ=os.environ,
                cores=os.cpu_count() or 1, metrics_port=settings.metrics_port, host=host)


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff for a child that failed: ``first_delay`` doubling up to ``max_delay``, at
    most ``max_restarts`` restarts within ``window`` seconds, then give up."""

    first_delay: float = 1.0
    max_delay: float = 30.0
    max_restarts: int = 5
    window: float = 600.0

    def delay(self, restarts: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting a child that failed at ``now``, given when it
        was restarted before (same clock); None when it failed too often: give up."""
        recent = sum(1 for t in restarts if now - t < self.window)
        if recent >= self.max_restarts:
            return None
        return float(backoff.exponential(recent, self.first_delay, self.max_delay))


@dataclass
class _Slot:
    child: Child
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: list[float] = field(default_factory=list)
    restart_at: float | None = None

    @property
    def name(self) -> str:
        gpu = self.child.gpu
        return f"{self.child.label} (GPU {gpu.index})" if gpu else self.child.label


def _exit_text(code: int) -> str:
    try:
        return f"code {code} ({signal.Signals(-code).name})" if code < 0 else f"code {code}"
    except ValueError:
        return f"code {code}"


class Supervisor:
    """Starts the children, restarts the ones that fail, forwards a stop to all of them.

    A first SIGTERM or SIGINT becomes SIGTERM to every child (Celery's warm shutdown:
    running tasks finish, exit 0; Celery answers SIGINT with exit 1 and a second SIGINT
    with a cold shutdown, so it is not passed on as is). A second becomes SIGQUIT (cold).
    """

    def __init__(self, children: Sequence[Child], policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.slots = [_Slot(child) for child in children]
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.stops = 0
        self.failed: _Slot | None = None
        self._signals: list[int] = []
        self._wake = threading.Event()

    def run(self) -> int:
        """Supervise until every child is gone; 0 after a stop, 1 when one failed too often.
        Call from the main thread (it installs SIGTERM and SIGINT handlers)."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        loaded = [m for m in HEAVY_MODULES if m in sys.modules]
        logger.info("launcher pid %d starts %d worker process(es); loaded here of %s: %s",
                    os.getpid(), len(self.slots), "/".join(HEAVY_MODULES),
                    ", ".join(loaded) or "none")
        try:
            for slot in self.slots:
                self._start(slot)
            while any(s.proc is not None or s.restart_at is not None for s in self.slots):
                self._wake.wait(_POLL_S)
                self._wake.clear()
                self._tick()
        finally:
            self._reap()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.failed is not None:
            logger.error("%s failed %d times within %.0f s; giving up", self.failed.name,
                         self.policy.max_restarts + 1, self.policy.window)
            return 1
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        self._wake.set()

    def _tick(self) -> None:
        while self._signals:
            self._stop(signal.Signals(self._signals.pop(0)).name)
        now = self.clock()
        for slot in self.slots:
            if slot.proc is not None and (code := slot.proc.poll()) is not None:
                self._exited(slot, code, now)
            if slot.restart_at is not None and not self.stops and now >= slot.restart_at:
                slot.restart_at = None
                self._start(slot)

    def _stop(self, why: str) -> None:
        self.stops += 1
        forward = signal.SIGTERM if self.stops == 1 else signal.SIGQUIT
        running = [s for s in self.slots if s.proc is not None]
        logger.info("%s: sending %s to %d worker process(es) (%s shutdown)", why,
                    forward.name, len(running), "warm" if self.stops == 1 else "cold")
        for slot in self.slots:
            slot.restart_at = None
            if slot.proc is not None:
                slot.proc.send_signal(forward)

    def _start(self, slot: _Slot) -> None:
        child = slot.child
        slot.proc = subprocess.Popen(child.argv, env={**os.environ, **child.env},
                                     process_group=0)  # a terminal's ^C reaches us only
        slot.started = self.clock()
        logger.info("started %s pid %d: %s", slot.name, slot.proc.pid,
                    " ".join(f"{k}={v}" for k, v in sorted(child.env.items())))

    def _exited(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.proc is not None
        pid, slot.proc = slot.proc.pid, None
        ran = (f"{slot.name} pid {pid} exited with {_exit_text(code)} after "
               f"{now - slot.started:.1f} s")
        if self.stops or code == 0:
            logger.info("%s; not restarted (%s)", ran, "stopping" if self.stops else "clean exit")
            return
        delay = self.policy.delay(slot.restarts, now)
        if delay is None:
            logger.error("%s; restarted %d times in the last %.0f s: not again", ran,
                         self.policy.max_restarts, self.policy.window)
            self.failed = self.failed or slot
            self._stop(f"{slot.name} failed too often")
            return
        slot.restarts.append(now)
        slot.restart_at = now + delay
        logger.warning("%s; restarting in %.0f s (restart %d of at most %d in %.0f s)", ran,
                       delay, len(slot.restarts), self.policy.max_restarts, self.policy.window)

    def _reap(self, timeout: float = 30.0) -> None:
        """After an unexpected error: stop what still runs, so no child outlives us."""
        running = [s.proc for s in self.slots if s.proc is not None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
