"""The ``inferq`` command line. Worker-side commands import ``workers`` lazily, so a
client-only install still runs ``score`` and ``status`` against a remote fleet."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import autoscale, dead_letters, drift, models, top
from cli.extras import worker_module
from cli.tables import say
from shared.errors import InferqError, Unavailable
from shared.repository import open_repository
from shared.settings import Settings, load_settings, scrub

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  pretty_exceptions_show_locals=False,  # locals may hold URLs with passwords
                  help="Queue-based inference: enqueue jobs, run batching workers, score files.")
models_app = typer.Typer(no_args_is_help=True, help="Build and list models in the repository.")
app.add_typer(models_app, name="models")
err = Console(stderr=True)
out = Console()


def _say(message: str) -> None:
    say(message, err)


def _setup_logging(level: str) -> bool:
    """Log to stderr as text, or one JSON object a line with INFERQ_LOG_FORMAT=json
    (docs/logs.md). -> whether JSON, so `inferq api` routes uvicorn's loggers here too."""
    from shared.logs import configure

    log_format = load_settings().log_format
    configure(level, log_format)
    return log_format == "json"


@contextlib.contextmanager
def _client(settings: Settings, models: list[str] | None = None) -> Iterator[Any]:
    """A Client; with no broker configured, also an in-process worker (embedded mode)."""
    from producer.client import Client
    from shared import tracing

    tracing.setup(settings.tracing, "inferq")

    client = Client(settings)
    if not settings.embedded:
        client.check_reachable()
        yield client
        return
    main = worker_module("main")
    with main.embedded_worker(settings, client.app, models):
        yield client


@app.command()
def score(
    model: Annotated[str, typer.Option(help="model name, or name@version")],
    input: Annotated[Path, typer.Option("--input", "-i", help=".npy, .csv, .jsonl or .parquet")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".parquet, .csv or .jsonl")],
    chunk_rows: Annotated[int | None, typer.Option(help="rows per message")] = None,
    resume: Annotated[bool, typer.Option(help="reuse finished chunks of an interrupted run")]
    = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    stall_timeout: Annotated[float | None, typer.Option(help="give up when no chunk finishes "
                                                        "for this many seconds")] = None,
    log_level: str = "WARNING",
) -> None:
    """Score every row of a file; output rows come in input order, errors in `error`."""
    from cli.progress import ScoreProgress
    from producer.files.score import score_file

    _setup_logging(log_level)
    settings = load_settings()
    name = model.partition("@")[0].partition(":")[0]
    shown = ScoreProgress(f"scoring {model}", err, on=progress)

    with _client(settings, [name]) as client:
        try:
            report = score_file(client, model, input, output, chunk_rows=chunk_rows,
                                resume=resume, stall_timeout=stall_timeout,
                                on_start=shown.start, on_chunk=shown.advance)
        except KeyboardInterrupt:
            shown.stop()
            _say(f"interrupted; finished chunks are kept. Resume with: inferq score "
                 f"--model {model} --input {input} --output {output} --resume")
            raise typer.Exit(130) from None
        finally:
            shown.stop()
    _say(f"{report.rows:,} rows ({report.failed:,} failed) in {report.seconds:.2f} s = "
         f"{report.rows_per_s:,.0f} rows/s; {report.sent_chunks} chunks sent, "
         f"{report.reused_chunks} reused -> {report.output}")


@app.command()
def worker(
    models: Annotated[str | None, typer.Option(help="comma list; default: every model")] = None,
    concurrency: Annotated[int | None, typer.Option(help="task threads")] = None,
    hostname: Annotated[str | None, typer.Option(help="node name, e.g. gpu0@%h")] = None,
    gpus: Annotated[str | None, typer.Option(help="all, none or indices such as 0,2: one "
                                             "worker process per GPU (docs/gpu.md)")] = None,
    processes: Annotated[int | None, typer.Option(min=1, help="with --gpus, when no GPU is "
                                                  "used: CPU worker processes (1)")] = None,
    dry_run: Annotated[bool, typer.Option(help="with --gpus: print the worker processes, "
                                          "start none")] = False,
    log_level: str = "INFO",
) -> None:
    """Run a batching worker on the models' queues (needs INFERQ_BROKER_URL)."""
    _setup_logging(log_level)
    settings = load_settings()
    if settings.embedded:
        raise InferqError("INFERQ_BROKER_URL: set it (redis://… or amqp://…) to run a "
                          "standalone worker; `inferq demo` runs the embedded default")
    if gpus is not None:  # a supervisor of worker processes; it never imports torch/ORT
        launcher = worker_module("launcher")
        children = launcher.children_for(gpus, settings, models=models, hostname=hostname,
                                         concurrency=concurrency, processes=processes,
                                         log_level=log_level)
        if dry_run:
            for child in children:
                typer.echo(child.describe())
            return
        raise typer.Exit(launcher.Supervisor(children).run())
    if processes is not None or dry_run:
        raise InferqError("--processes and --dry-run go with --gpus, e.g. "
                          "`inferq worker --gpus none --processes 2`")
    main = worker_module("main")
    names = [m.strip() for m in models.split(",")] if models else None
    raise typer.Exit(main.run_worker(settings, names, concurrency=concurrency,
                                     hostname=hostname, loglevel=log_level.upper()))


@app.command()
def demo(log_level: str = "WARNING") -> None:
    """Build digits if missing, score the 1,797 images through the queue, print accuracy."""
    from cli.demo import run_demo

    _setup_logging(log_level)
    settings = load_settings()
    build = worker_module("build.digits")
    version = build.ensure_digits(open_repository(settings))
    images, labels = build.load_digits_data()
    out.print(run_demo(settings, _client(settings, ["digits"]), version, images, labels))


@app.command()
def api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[int, typer.Option(
        min=0, help="API processes sharing the port; 0 = one per core")] = 0,
    log_level: str = "INFO",
) -> None:
    """Serve the HTTP results API (needs INFERQ_BROKER_URL and a Redis result store)."""
    try:
        import uvicorn

        from api import serve
    except ImportError as exc:
        raise InferqError(f"this command needs the api extra ({exc}); install it with: "
                          "pip install 'inferq[api]'") from None
    json_logs = _setup_logging(log_level)
    serve.run(host, port, workers or os.cpu_count() or 1, log_level, json_logs, uvicorn)


@app.command("api-key")
def api_key(
    tenant: Annotated[str, typer.Option(help="the tenant this key acts for")],
    keys_file: Annotated[Path, typer.Option(help="JSON keys file (INFERQ_API_KEYS_FILE)")],
    rate_per_s: Annotated[int | None, typer.Option(help="requests/s for this key")] = None,
    queue_share: Annotated[float | None, typer.Option(
        min=0.001, max=1.0, help="this tenant's share of each model's queue limit "
        "(default INFERQ_API_TENANT_QUEUE_SHARE)")] = None,
) -> None:
    """Create an API key for a tenant; only its hash is stored. Shown once."""
    from api.auth import add_key

    key, key_id, secret = add_key(keys_file, tenant, rate_per_s, queue_share)
    out.print_json(json.dumps({"tenant": tenant, "key_id": key_id, "api_key": key,
                               "callback_secret": secret, "keys_file": str(keys_file)}))


@app.command()
def status(job_id: str) -> None:
    """Print a job's status and result as JSON."""
    from producer.client import Client

    res = Client(load_settings()).get(job_id)
    data = res.model_dump(mode="json", exclude={"outputs"})
    if res.outputs is not None:
        data["outputs"] = {k: v.tolist() for k, v in res.outputs.items()}
    out.print_json(json.dumps(data))


def main() -> None:
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    try:
        app()
    except Unavailable as exc:  # a service is away: its own exit code, as below
        _say(f"error: {scrub(str(exc))}")
        sys.exit(3)
    except InferqError as exc:
        _say(f"error: {scrub(str(exc))}")
        sys.exit(2)
    except (RedisError, OperationalError, TimeoutError) as exc:  # a service is away
        _say(f"error: {type(exc).__name__}: {scrub(str(exc))} (is the broker or result "
             "store reachable? see INFERQ_BROKER_URL, INFERQ_RESULT_BACKEND)")
        sys.exit(3)


models.register(app, models_app)
dead_letters.register(app)
drift.register(app)
app.command("autoscale")(autoscale.command)
app.command("top")(top.command)

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
