"""A Redis server owned by one test: started on a free port, stopped and started again
on the same port and data folder (to take a broker or result store away and back)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import restartable_port, stop_process


class RedisServer:
    """``redis-server`` with an append-only file fsynced on every write, so a restart
    keeps everything acknowledged before it (``aof=False``: a restart starts empty)."""

    def __init__(self, folder: Path, *, aof: bool = True):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = restartable_port()  # restarted on the same port
        self.aof = aof
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20) -> None:
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof \
            else ["--appendonly", "no"]
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *persist,
               "--dir", str(self.folder), "--save", "", "--logfile",
               str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.starts += 1
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # still loading the append-only file
                except redis.exceptions.ConnectionError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                           + self._log_tail()) from None
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not answer PING: " + self._log_tail())
                time.sleep(0.05)  # a port opening in another process: nothing to wait on
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs its append-only file and exits (SIGKILL after 20 s)."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self) -> str:
        log = self.folder / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
