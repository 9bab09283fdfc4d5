"""``python -m bench soak``: worker memory over a long run of mixed traffic.

One inferq worker serves digits for ``minutes``; the bench alternates a bulk job of
``bulk_rows`` rows with a few seconds of 16 online clients, and samples the worker's RSS
every few seconds. Flat means the last minute's median RSS is within ``FLAT_MB`` (plus
1%) of the second minute's (the first minute holds the warm-up: pools, arenas, caches).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench import data
from bench.config import MODELS, REDIS_URL, BenchEnv, ensure_models, model_repo
from bench.modes import inferq_call, online
from bench.procs import WorkerProcess, proc_status_kb

FLAT_MB = 16.0


def _rss_mb(pid: int) -> float | None:
    kb = proc_status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def soak(minutes: float, bulk_rows: int = 200_000, json_path: Path | None = None) -> int:
    import redis

    from producer.client import Client
    from shared.settings import load_settings

    repo = model_repo()
    ensure_models(repo, ["digits"])
    workdir = Path(tempfile.mkdtemp(prefix="inferq-soak-"))
    env = BenchEnv.create(repo, workdir / "home")
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    ref, base = MODELS["digits"], data.base_rows("digits")
    client = Client(load_settings(**env.settings_overrides()))
    samples: list[tuple[float, float]] = []
    rows = jobs = 0
    with WorkerProcess.inferq("digits", env.process_env(), workdir / "worker.log") as worker:
        worker.wait_ready()
        started = time.monotonic()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(5.0):
                mb = _rss_mb(worker.pid)
                if mb is not None:
                    samples.append((time.monotonic() - started, mb))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            while time.monotonic() - started < minutes * 60:
                rows += len(client.submit_many(ref, data.tiled(base, bulk_rows))
                            .results(timeout=120))
                jobs += online(inferq_call(client, ref, 60), base, 16, 3.0).rows
                store.flushdb()  # results are read; keep Redis's memory out of the picture
        finally:
            done.set()
            sampler.join(10)
            store.flushdb()
    second = [mb for t, mb in samples if 60 <= t < 120] or [samples[0][1]]
    last = [mb for t, mb in samples if t >= samples[-1][0] - 60]
    early, late = statistics.median(second), statistics.median(last)
    flat = late <= early * 1.01 + FLAT_MB
    print(f"soak {minutes:g} min: {rows:,} bulk rows + {jobs:,} online jobs; worker RSS "
          f"median {early:.0f} MB in minute 2, {late:.0f} MB in the last minute, peak "
          f"{max(mb for _, mb in samples):.0f} MB: {'PASS flat' if flat else 'MISS growing'}")
    if json_path is not None:
        json_path.write_text(json.dumps({"minutes": minutes, "rows": rows, "jobs": jobs,
                                         "rss_mb": samples, "flat": flat}, indent=1))
    return 0 if flat else 1
