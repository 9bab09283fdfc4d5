"""``inferq drift MODEL``: how far the inputs workers see have moved from the reference."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.settings import load_settings

out = Console()


def drift(
    model: Annotated[str, typer.Argument(help="model name (every version workers serve)")],
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for workers")] = 5.0,
) -> None:
    """Drift of MODEL's inputs (PSI vs its reference data), summed over live workers."""
    from shared.celery_app import make_app, require_broadcasts
    from workers.drift import DRIFT_THRESHOLD, report

    app = make_app(load_settings())
    require_broadcasts(app, "inferq drift")
    replies = app.control.broadcast("inferq_drift", reply=True, timeout=timeout)
    states: dict[str, list[dict]] = {}
    for reply in replies:
        for per_version in reply.values():
            for key, state in per_version.items():
                if key.split("@")[0] == model:
                    states.setdefault(key, []).append(state)
    reports = {key: {**report(found), "workers": len(found)}
               for key, found in sorted(states.items())}
    if as_json:
        typer.echo(json.dumps(reports))
        return
    if not reports:
        typer.echo(f"no live worker serves {model!r} with reference statistics")
        raise typer.Exit(1)
    table = Table("version", "workers", "rows seen", "PSI", "verdict", "most shifted",
                  title=f"input drift of {model} (PSI over {DRIFT_THRESHOLD}: drift)")
    for key, r in reports.items():
        worst = ", ".join(f"{f['feature']} {f['psi']:.2f}" for f in r["features"][:3])
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        table.add_row(key, str(r["workers"]), f"{r['rows']:,}", score, r["verdict"], worst)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("drift")(drift)
