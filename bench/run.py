"""``python -m bench run``: every mode of every model, then the table and the JSON file."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import data
from bench.config import (
    BENCH_DIR,
    FULL,
    MODELS,
    QUICK,
    REDIS_URL,
    BenchEnv,
    ensure_models,
    model_repo,
)
from bench.report import Row, apply_ratios, apply_targets, table, write_json
from bench.steps import Context, run_inferq, run_limit, run_naive, say


def _serve_bench_variants(repo: Path, names: list[str]) -> None:
    """In bench/.models only: make the benched variant the default, so each worker loads
    and warms just the model it serves (a user's INFERQ_MODEL_REPO is left as it is)."""
    from shared.repository import ModelRepository

    if os.environ.get("INFERQ_MODEL_REPO"):
        return
    for name in names:
        ModelRepository(repo).set_default(name, variant=MODELS[name].split(":")[1])


def _meta(env: BenchEnv, client: Any, names: list[str], quick: bool) -> dict[str, Any]:
    import celery
    import onnxruntime

    s = client.settings
    return {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick, "models": {n: MODELS[n] for n in names},
        "ort_threads": env.ort_threads, "chunk_rows": s.chunk_rows,  # None: per model
        "max_batch_rows": s.max_batch_rows, "max_delay_ms": s.max_delay_ms,
        "worker_concurrency": s.concurrency, "max_in_flight": s.max_in_flight,
        "naive_worker": "celery -P threads -c 4 --prefetch-multiplier 1, json",
        "redis": REDIS_URL, "model_repo": str(env.model_repo),
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "python": platform.python_version(), "celery": celery.__version__,
        "onnxruntime": onnxruntime.__version__, "host": platform.node(),
        "cpu_columns": "cores used during the mode: prod = the producer (the bench "
                       "process, or `inferq score`), wrk = the worker, redis = all of "
                       "Redis, other = the rest of the machine",
    }


def _default_json() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return BENCH_DIR / "results" / f"{stamp}.json"


def run_all(names: list[str], *, quick: bool, json_path: Path | None) -> int:
    import redis

    from producer.client import Client
    from shared.settings import load_settings

    repo = model_repo()
    ensure_models(repo, names)
    _serve_bench_variants(repo, names)
    workdir = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    env = BenchEnv.create(repo, workdir / "home")
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    rows: list[Row] = []
    try:
        client = Client(load_settings(**env.settings_overrides()))
        ctx = Context(env, QUICK if quick else FULL, client, store, workdir, rows)
        meta = _meta(env, client, names, quick)
        chunks = client.settings.chunk_rows or "per model"
        say(f"bench: {'quick' if quick else 'full'} run of {', '.join(names)}; "
            f"{env.ort_threads} ORT thread(s); chunk rows {chunks}")
        for name in names:
            ref, base = MODELS[name], data.base_rows(name)
            run_limit(ctx, name, ref, base)
            run_inferq(ctx, name, ref, base)
            store.flushdb()
            run_naive(ctx, name, ref, base)
            store.flushdb()
    except BaseException:
        store.flushdb()
        say(f"bench failed; worker logs kept in {workdir}")
        raise
    store.flushdb()
    shutil.rmtree(workdir, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()
    apply_ratios(rows)
    apply_targets(rows)
    print(table(rows), flush=True)
    path = json_path or _default_json()
    write_json(path, meta, rows)
    say(f"results: {path}")
    return 0
