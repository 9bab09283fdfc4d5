"""``inferq dead-letters``: what was not run again after killing its worker, and why."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.claims import redis_of
from shared.dead_letters import purge_dead_letters, read_dead_letters
from shared.errors import ConfigError
from shared.settings import load_settings

out = Console()


def dead_letters(
    limit: Annotated[int, typer.Option(min=1, help="newest entries to show")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON entry per line")] = False,
    purge: Annotated[bool, typer.Option(help="delete every entry (after showing them)")] = False,
) -> None:
    """List dead-lettered jobs and rows, newest first (they live in the result store)."""
    from shared.celery_app import make_app

    settings = load_settings()
    redis = redis_of(make_app(settings).backend)
    if redis is None:
        raise ConfigError("INFERQ_RESULT_BACKEND: dead letters live in a Redis result store; "
                          "the embedded default has none")
    entries = read_dead_letters(redis, settings.queue_prefix, limit)
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
    else:
        table = Table("at (UTC)", "model", "jobs", "rows", "deliveries", "reason",
                      title=f"{len(entries)} dead letters (newest first)")
        for e in entries:
            at = dt.datetime.fromtimestamp(e["at"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(at, e.get("model", ""), ", ".join(e.get("jobs", [])),
                          ", ".join(map(str, e.get("rows", []))) or "all",
                          str(e.get("deliveries", "")), e.get("reason", ""))
        out.print(table)
    if purge:
        typer.echo(f"purged {purge_dead_letters(redis, settings.queue_prefix)} entries")


def register(app: typer.Typer) -> None:
    app.command("dead-letters")(dead_letters)
