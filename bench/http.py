"""The HTTP rows: the same worker and rows as the native online rows, but each job a
``POST /v1/models/<m>/jobs?wait=30s`` to ``inferq api`` (one process per core by
default), from bench/http_load.py's lean load generator. CPU is split per process; the
API's and the worker's CPU milliseconds per request are in each row."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from bench.config import MODELS, ONLINE_CONCURRENCY
from bench.cpu import cpu_cores, self_cpu_seconds
from bench.http_load import run
from bench.procs import ApiProcess, WorkerProcess

KEY = "bench-http-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def bodies(base: np.ndarray) -> list[bytes]:
    """One JSON job body per distinct row, encoded once."""
    if base.dtype == object:
        return [json.dumps({"inputs": str(v)}).encode() for v in base]
    return [json.dumps({"inputs": row.ravel().tolist()}).encode() for row in base]


def api_workers() -> int:
    return int(os.environ.get("BENCH_API_WORKERS") or 0) or (os.cpu_count() or 1)


def run_http(ctx: Any, name: str, ref: str, base: np.ndarray, worker: WorkerProcess,
             row: Any, say: Any) -> None:
    """``row(mode, ref, measured, cpu, **kw)`` builds a table row (bench/steps.py)."""
    encoded = bodies(base)

    def body(i: int) -> tuple[str, bytes]:
        return "application/json", encoded[i % len(encoded)]

    n = api_workers()
    env = ctx.env.process_env(INFERQ_API_KEYS=f"bench:{KEY}", INFERQ_API_RATE_PER_S="0")
    path = f"/v1/models/{ref}/jobs?wait=30s"
    with ApiProcess(env, ctx.workdir / f"api-{name}.log", n) as api:
        api.wait_ready()
        run(api.url, path, body, 8, 1.0, HEADERS)  # connections, first requests
        for c in ONLINE_CONCURRENCY:
            sources = {"producer": self_cpu_seconds, "api": api.cpu_seconds,
                       "worker": worker.cpu_seconds}
            with cpu_cores(sources, ctx.redis) as cpu:
                m = run(api.url, path, body, c, ctx.sizes.online_seconds, HEADERS)
            per_request = {f"{k}_cpu_ms_per_request": round(cpu[k] * m.seconds * 1000
                                                            / max(m.rows, 1), 3)
                           for k in ("api", "worker", "redis", "producer")}
            ctx.rows.append(row("http", ref, m, cpu, concurrency=c,
                                extra={"api_processes": n, **per_request}))
            say(f"{ref} http C={c}: {m.rows_per_s:,.0f} jobs/s, p50 {m.p50_ms or 0:.2f} ms, "
                f"p99 {m.p99_ms or 0:.2f} ms, api {per_request['api_cpu_ms_per_request']} "
                f"ms CPU/request (cpu {cpu}{', errors ' + str(m.errors) if m.errors else ''}"
                f"{' ' + str(m.first_error) if m.errors else ''})")


SDK_CONCURRENCY = (64, 256)


def sdk_ceiling(ctx: Any, ref: str, base: np.ndarray, worker: WorkerProcess, row: Any,
                say: Any) -> None:
    """The SDK process's own ceiling: C threads on ``Client`` (C=256) and C coroutines
    on ``AsyncClient``, native, with the producer's CPU per job."""
    from bench.modes import inferq_call, online, online_async
    from bench.steps import TIMEOUT

    seconds = ctx.sizes.online_seconds
    runs = [("online", 256)] + [("async", c) for c in SDK_CONCURRENCY]
    for mode, c in runs:
        sources = {"producer": self_cpu_seconds, "worker": worker.cpu_seconds}
        with cpu_cores(sources, ctx.redis) as cpu:
            m = (online(inferq_call(ctx.client, ref, TIMEOUT), base, c, seconds)
                 if mode == "online" else
                 online_async(ctx.client, ref, base, c, seconds, TIMEOUT))
        per_job = round(cpu["producer"] * m.seconds * 1000 / max(m.rows, 1), 3)
        ctx.rows.append(row(mode, ref, m, cpu, concurrency=c,
                            extra={"producer_cpu_ms_per_job": per_job}))
        say(f"{ref} {'threads' if mode == 'online' else 'asyncio'} C={c}: "
            f"{m.rows_per_s:,.0f} jobs/s, p50 {m.p50_ms or 0:.2f} ms, producer {per_job} ms "
            f"CPU/job (cpu {cpu}{', errors ' + str(m.errors) if m.errors else ''})")


def http_only(names: list[str], seconds: float) -> int:
    """``python -m bench http``: per model one worker; the native online rows, then the
    HTTP rows, in one run (for iterating on the HTTP path without the whole bench)."""
    import shutil
    import tempfile
    from pathlib import Path

    import redis

    from bench import data
    from bench.config import QUICK, REDIS_URL, BenchEnv, ensure_models, model_repo
    from bench.modes import inferq_call, online
    from bench.report import Row, apply_ratios, apply_targets, table
    from bench.steps import TIMEOUT, Context, _row, _warm_inferq, run_limit, say
    from producer.client import Client
    from shared.settings import load_settings

    repo = model_repo()
    ensure_models(repo, names)
    workdir = Path(tempfile.mkdtemp(prefix="inferq-bench-http-"))
    env = BenchEnv.create(repo, workdir / "home")
    store = redis.Redis.from_url(REDIS_URL)
    rows: list[Row] = []
    sizes = QUICK.__class__(**{**QUICK.__dict__, "online_seconds": seconds})
    try:
        client = Client(load_settings(**env.settings_overrides()))
        ctx = Context(env, sizes, client, store, workdir, rows)
        for name in names:
            ref = MODELS[name]
            base = data.base_rows(name)
            run_limit(ctx, name, ref, base)
            log = workdir / f"worker-{name}.log"
            with WorkerProcess.inferq(name, env.process_env(), log) as worker:
                worker.wait_ready()
                _warm_inferq(ctx, ref, base)
                for c in ONLINE_CONCURRENCY:
                    sources = {"producer": self_cpu_seconds, "worker": worker.cpu_seconds}
                    with cpu_cores(sources, store) as cpu:
                        m = online(inferq_call(client, ref, TIMEOUT), base, c, seconds)
                    rows.append(_row("online", ref, m, cpu, concurrency=c))
                    say(f"{ref} native C={c}: {m.rows_per_s:,.0f} jobs/s, p50 "
                        f"{m.p50_ms or 0:.2f} ms (cpu {cpu})")
                sdk_ceiling(ctx, ref, base, worker, _row, say)
                run_http(ctx, name, ref, base, worker, _row, say)
        apply_ratios(rows)
        apply_targets(rows)
        print(table(rows), flush=True)
    finally:
        store.flushdb()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
