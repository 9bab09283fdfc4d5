"""A lean HTTP/1.1 load generator: ``concurrency`` keep-alive connections on one asyncio
loop, each sending one request after another for ``seconds``. Plain sockets, no client
library, so that the load generator's own CPU stays small beside the server it measures
(it shares the machine's cores)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from bench.modes import Measured, percentiles

Body = Callable[[int], tuple[str, bytes]]  # request number -> (content type, body)


class _Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(head + body)
        status_line = await self.reader.readuntil(b"\r\n")
        headers = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split(b" ", 2)[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run(url: str, path: str, body: Body, concurrency: int, seconds: float,
        headers: dict[str, str] | None = None) -> Measured:
    """POST ``body(i)`` to ``path`` from ``concurrency`` connections back to back; a
    request counts when it answers 200 (else it is an error, its text kept once)."""
    return asyncio.run(_run(url, path, body, concurrency, seconds, headers or {}))


async def _run(url: str, path: str, body: Body, concurrency: int, seconds: float,
               headers: dict[str, str]) -> Measured:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    async def client(k: int) -> None:
        conn = _Connection(host, port)
        try:
            while time.monotonic() < stop_at:
                kind, data = body(k)
                k += concurrency
                head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
                        f"Content-Type: {kind}\r\nContent-Length: {len(data)}\r\n\r\n").encode()
                t0 = time.perf_counter()
                try:
                    status, payload = await conn.request(head, data)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = _Connection(host, port)
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(f"HTTP {status}: {payload[:200]!r}")
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    p50, p99 = percentiles(latencies)
    return Measured(len(latencies), elapsed, len(errors), errors[0] if errors else None,
                    p50, p99)
