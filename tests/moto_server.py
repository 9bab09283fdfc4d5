"""moto's standalone server (S3, SQS, ... over their real HTTP protocols) on a free
loopback port, started by a test and stopped by PID."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, stop_process

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[dict[str, str]]:
    """Yields the environment a client needs: the endpoint and test credentials (boto3
    reads ``AWS_ENDPOINT_URL`` by itself)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("moto server did not start:\n"
                                           + log.read_text(errors="replace")[-2000:]) from None
                    time.sleep(0.1)  # a port opening in another process
            yield {"AWS_ENDPOINT_URL": url, **CREDENTIALS}
        finally:
            stop_process(proc)
