"""``python -m bench brokers``: bulk digits and single jobs through Redis and through Amazon
SQS (moto's standalone server on loopback, the results on Redis both times), one worker
each, in one run on this machine.

Bulk: ``Client.submit_many`` of the rows, timed from the first send to the last result;
chunks are sized per broker (1 MiB of input per message on Redis, 128 KiB on SQS:
producer/bulk/chunks.py). Single: one job at a time, submit to result, p50 and p90.
moto is an in-process Python server, not AWS: the SQS figures show inferq's own cost per
message plus moto's, not AWS's network latency (~10-20 ms per call within a region).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.config import REDIS_URL, ROOT
from bench.procs import WorkerProcess
from tests.moto_server import moto_server


def _measure(name: str, env: dict[str, str], rows: np.ndarray, singles: int,
             log: Path) -> dict[str, Any]:
    from producer.client import Client
    from shared.settings import load_settings

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    settings = load_settings(**{k[len("INFERQ_"):].lower(): v for k, v in env.items()
                                if k.startswith("INFERQ_")})
    with WorkerProcess.inferq("digits", {**os.environ, **env, "PYTHONPATH": str(ROOT)},
                              log) as worker:
        worker.wait_ready()
        client = Client(settings)
        client.submit_many("digits", rows[:2048]).results(timeout=120)  # warm both ends
        cpu0, started = worker.cpu_seconds(), time.perf_counter()
        batch = client.submit_many("digits", rows)
        labels = batch.results(timeout=120).outputs["label"]
        bulk_s = time.perf_counter() - started
        worker_cpu = worker.cpu_seconds() - cpu0
        latencies = []
        for i in range(singles):
            t = time.perf_counter()
            client.wait(client.submit("digits", rows[i]).id, timeout=60)
            latencies.append((time.perf_counter() - t) * 1000)
    q = statistics.quantiles(latencies, n=10)
    return {"broker": name, "rows": len(rows), "chunks": len(batch.chunks),
            "bulk_s": bulk_s, "rows_per_s": len(rows) / bulk_s,
            "worker_cpu_ms_per_chunk": worker_cpu / len(batch.chunks) * 1000,
            "single_p50_ms": statistics.median(latencies), "single_p90_ms": q[8],
            "labels": labels}


def brokers(rows: int = 100_000, singles: int = 50) -> int:
    from workers.build.digits import build_digits, load_digits_data

    images, _ = load_digits_data()
    data = np.concatenate([images] * (-(-rows // len(images))))[:rows]
    store = redis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory(prefix="inferq-bench-brokers-") as tmp:
        repo = Path(tmp) / "models"
        build_digits(repo)
        base = {"INFERQ_RESULT_BACKEND": REDIS_URL, "INFERQ_MODEL_REPO": str(repo),
                "INFERQ_ORT_THREADS": os.environ.get("INFERQ_ORT_THREADS", "1")}
        results = []
        with moto_server(Path(tmp) / "moto.log") as aws:  # the tests' own starter
            for name, broker in (("redis", REDIS_URL), ("sqs", "sqs://")):
                prefix = f"bench.brokers.{name}."
                env = {**base, "INFERQ_BROKER_URL": broker, "INFERQ_QUEUE_PREFIX": prefix,
                       "INFERQ_HOME": str(Path(tmp) / name), **aws}
                try:
                    results.append(_measure(name, env, data, singles,
                                            Path(tmp) / f"{name}.log"))
                finally:
                    for key in store.scan_iter(match=f"*{prefix}*", count=1000):
                        store.delete(key)
    same = np.array_equal(results[0].pop("labels"), results[1].pop("labels"))
    print(f"digits, {rows:,} rows in bulk and {singles} single jobs, one worker "
          f"({os.cpu_count()} cores); results on Redis both times; labels identical: {same}")
    print(f"{'broker':8} {'chunks':>7} {'bulk s':>8} {'rows/s':>9} {'worker ms/chunk':>16} "
          f"{'single p50 ms':>14} {'p90 ms':>7}")
    for r in results:
        print(f"{r['broker']:8} {r['chunks']:>7} {r['bulk_s']:>8.2f} {r['rows_per_s']:>9,.0f} "
              f"{r['worker_cpu_ms_per_chunk']:>16.1f} {r['single_p50_ms']:>14.1f} "
              f"{r['single_p90_ms']:>7.1f}")
    return 0 if same else 1
