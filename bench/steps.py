"""One model's modes in order: limit, inferq (bulk, online, memory), then the naive baseline.

Only one worker runs at a time, so each mode has the machine to itself (besides whatever
else shares it, which the ``other`` CPU column shows).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import data
from bench.config import LIMIT_BATCHES, ONLINE_CONCURRENCY, BenchEnv, Sizes
from bench.cpu import cpu_cores, self_cpu_seconds
from bench.http import run_http
from bench.limit import measure_limit
from bench.memory import score_subprocess
from bench.modes import Measured, inferq_bulk, inferq_call, naive_bulk, naive_call, online
from bench.procs import WorkerProcess
from bench.report import Row
from producer.bulk.chunks import chunk_rows_for

TIMEOUT = 120.0  # seconds any one result may take before the run fails


@dataclass
class Context:
    env: BenchEnv
    sizes: Sizes
    client: Any  # producer.client.Client on the bench's Redis database
    redis: Any
    workdir: Path
    rows: list[Row]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row(mode: str, ref: str, m: Measured, cpu: dict[str, float], **kw: Any) -> Row:
    extra = kw.pop("extra", {})
    if m.errors:
        extra.update(errors=m.errors, first_error=m.first_error)
    return Row(mode, ref, rows=m.rows, seconds=round(m.seconds, 3),
               rows_per_s=m.rows_per_s, p50_ms=m.p50_ms, p99_ms=m.p99_ms, cpu=cpu,
               extra=extra, **kw)


def run_limit(ctx: Context, name: str, ref: str, base: np.ndarray) -> None:
    with cpu_cores({"producer": self_cpu_seconds}, ctx.redis) as cpu:
        res = measure_limit(ctx.env.model_repo, ref, ctx.env.ort_threads, LIMIT_BATCHES[name],
                            base, ctx.sizes.limit_rows[name])
    by_batch = {b: round(v, 1) for b, v in res.by_batch.items()}
    ctx.rows.append(Row("limit", ref, rows=res.rows, seconds=round(res.seconds, 3),
                        rows_per_s=res.rows_per_s, cpu=cpu,
                        extra={"best_batch": res.best_batch, "rows_per_s_by_batch": by_batch,
                               "ort_threads": ctx.env.ort_threads,
                               "artifact": res.artifact}))
    say(f"{ref} limit: {res.rows_per_s:,.0f} rows/s (batch {res.best_batch}; {by_batch})")


def _warm_inferq(ctx: Context, ref: str, base: np.ndarray) -> None:
    """Connections, the worker's first calls: paid once, outside every measurement."""
    ctx.client.submit_many(ref, data.tiled(base, ctx.sizes.warmup_rows[ref.split(":")[0]])
                           ).results(timeout=TIMEOUT)
    for row in base[:8]:
        ctx.client.submit(ref, row).result(timeout=TIMEOUT)


def run_inferq(ctx: Context, name: str, ref: str, base: np.ndarray) -> None:
    log = ctx.workdir / f"inferq-worker-{name}.log"
    with WorkerProcess.inferq(name, ctx.env.process_env(), log) as worker:
        worker.wait_ready()
        _warm_inferq(ctx, ref, base)
        sources = {"producer": self_cpu_seconds, "worker": worker.cpu_seconds}
        rows = data.tiled(base, ctx.sizes.bulk_rows[name])
        with cpu_cores(sources, ctx.redis) as cpu:
            m = inferq_bulk(ctx.client, ref, rows, TIMEOUT)
        manifest = ctx.client.model(ref)[0].manifest
        chunk_rows = chunk_rows_for(manifest, ctx.client.settings.chunk_rows)
        ctx.rows.append(_row("bulk", ref, m, cpu, rss_mb=worker.peak_rss_mb(),
                             extra={"chunk_rows": chunk_rows}))
        say(f"{ref} bulk: {m.rows_per_s:,.0f} rows/s ({m.rows:,} rows, chunks of "
            f"{chunk_rows}, cpu {cpu})")
        for c in ONLINE_CONCURRENCY:
            with cpu_cores(sources, ctx.redis) as cpu:
                m = online(inferq_call(ctx.client, ref, TIMEOUT), base, c,
                           ctx.sizes.online_seconds)
            ctx.rows.append(_row("online", ref, m, cpu, concurrency=c,
                                 rss_mb=worker.peak_rss_mb(),
                                 extra={"p50_ms_until_stored": m.stored_p50_ms}))
            say(f"{ref} online C={c}: {m.rows_per_s:,.0f} jobs/s, p50 {m.p50_ms or 0:.2f} ms, "
                f"p99 {m.p99_ms or 0:.2f} ms, p50 until stored {m.stored_p50_ms or 0:.2f} ms "
                f"(cpu {cpu}{', errors ' + str(m.errors) if m.errors else ''})")
        run_http(ctx, name, ref, base, worker, _row, say)
        if name == "digits":
            run_producer_rss(ctx, ref, worker)
        stats = ctx.client.app.control.broadcast("inferq_stats", reply=True, timeout=3,
                                                   limit=1)
        ctx.rows.append(Row("worker-rss", ref, rss_mb=worker.peak_rss_mb(),
                            extra={"pid": worker.pid, "inferq_stats": stats,
                                   "loaded": _loaded(worker)}))
        say(f"{ref} worker peak RSS: {worker.peak_rss_mb():.0f} MB")


def _loaded(worker: WorkerProcess) -> list[str]:
    with worker.log.open(errors="replace") as log:
        return [line.split(": ", 1)[-1][:160].rstrip() for line in log
                if "workers.runtimes." in line and ": loaded " in line]


def run_producer_rss(ctx: Context, ref: str, worker: WorkerProcess) -> None:
    rows = ctx.sizes.score_rows
    source = data.write_digits_npy(ctx.workdir / "score-input.npy", rows)
    output = ctx.workdir / "score-output.parquet"
    with cpu_cores({"worker": worker.cpu_seconds}, ctx.redis) as cpu:
        run = score_subprocess(ref, source, output, ctx.env.process_env(), rows, 600)
    if run.returncode != 0:
        raise RuntimeError(f"inferq score failed ({run.returncode}):\n{run.stderr_tail}")
    cpu["producer"] = round(run.cpu_seconds / run.seconds, 2)
    extra = {"input_mb": round(source.stat().st_size / 2**20, 1),
             "output_mb": round(output.stat().st_size / 2**20, 1),
             "wall_s_with_startup": round(run.seconds, 2),
             "rss_source": "VmHWM at exit", "polled_peaks_mb": run.polled_mb}
    source.unlink()
    output.unlink()
    ctx.rows.append(Row("producer-rss", ref, rows=rows, seconds=round(run.seconds, 3),
                        rows_per_s=run.reported_rows_per_s, rss_mb=run.peak_rss_mb, cpu=cpu,
                        extra=extra))
    say(f"{ref} inferq score {rows:,} rows: producer peak RSS {run.peak_rss_mb or 0:.0f} MB, "
        f"{run.reported_rows_per_s or 0:,.0f} rows/s")


def run_naive(ctx: Context, name: str, ref: str, base: np.ndarray) -> None:
    from shared.repository import ModelRepository

    version = ModelRepository(ctx.env.model_repo).resolve(ref)
    env = ctx.env.process_env(BENCH_NAIVE_MODEL=str(version.path),
                              BENCH_NAIVE_THREADS=str(ctx.env.ort_threads))
    rows = data.json_rows(base)
    with WorkerProcess.naive(env, ctx.workdir / f"naive-worker-{name}.log") as worker:
        worker.wait_ready()
        naive_bulk(rows[:32], TIMEOUT)  # loads the model, opens connections
        sources = {"producer": self_cpu_seconds, "worker": worker.cpu_seconds}
        n = ctx.sizes.naive_rows[name]
        with cpu_cores(sources, ctx.redis) as cpu:
            m = naive_bulk([rows[i % len(rows)] for i in range(n)], TIMEOUT)
        extra = {"pool": "threads", "concurrency": 4, "serializer": "json"}
        ctx.rows.append(_row("naive-bulk", ref, m, cpu, rss_mb=worker.peak_rss_mb(),
                             extra=extra))
        say(f"{ref} naive bulk: {m.rows_per_s:,.0f} rows/s ({m.rows:,} rows, cpu {cpu})")
        with cpu_cores(sources, ctx.redis) as cpu:
            m = online(naive_call(TIMEOUT), rows, 1, ctx.sizes.online_seconds)
        ctx.rows.append(_row("naive-online", ref, m, cpu, concurrency=1,
                             rss_mb=worker.peak_rss_mb(), extra=extra))
        say(f"{ref} naive online C=1: {m.rows_per_s:,.0f} jobs/s, p50 {m.p50_ms or 0:.2f} ms")
