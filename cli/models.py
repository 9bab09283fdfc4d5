"""``inferq models …`` and ``inferq compress``: build, list, show, set defaults, compress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli.extras import worker_module
from cli.tables import Grid, print_json, say, show
from shared.catalog import Publisher
from shared.errors import InferqError
from shared.repository import ModelRepository, ModelVersion, open_repository, parse_model_ref
from shared.settings import load_settings

out = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="JSON records, for programs")]

_QUALITY_KEYS = ("heldout_accuracy", "accuracy_delta_vs_parent", "mean_cosine_vs_parent",
                 "nn_agreement_vs_parent", "top1_agreement")


def _repo() -> ModelRepository:
    return open_repository(load_settings())


def _announce(repo: ModelRepository, names: list[str]) -> None:
    """Put the changed models' manifests in the result store's catalog now, so clients
    with no model folder see them before a worker's next round (shared/catalog.py)."""
    Publisher(load_settings(), repo, names, prune=True).publish_once()


def _record(v: ModelVersion, default: ModelVersion | None, parent_speed: dict[int, float]
            ) -> dict[str, Any]:
    m = v.manifest
    return {"version": v.key, "serves": default is not None and default.key == v.key,
            "variant": m.variant, "runtime": m.runtime, "compression": m.compression.method,
            "size_bytes": m.size_bytes,
            "quality": {k: m.quality[k] for k in _QUALITY_KEYS if k in m.quality},
            "rows_per_s": m.speed.get("rows_per_s") or parent_speed.get(m.version),
            "speedup_vs_parent": m.speed.get("speedup_vs_parent")}


def _cells(r: dict[str, Any]) -> list[str]:
    quality = ", ".join(f"{k.replace('_vs_parent', '')}={value:.4f}"
                        for k, value in r["quality"].items())
    speed, ratio = r["rows_per_s"], r["speedup_vs_parent"]
    return [r["version"] + ("*" if r["serves"] else ""), r["variant"], r["runtime"],
            r["compression"], f"{r['size_bytes'] / 1e6:.2f} MB", quality,
            f"{speed:,.0f}" if speed else "-", f"{ratio:.2f}x" if ratio else "-"]


def _records(repo: ModelRepository, names: list[str]) -> list[dict[str, Any]]:
    records = []
    for name in names:
        try:
            default = repo.resolve(name)
        except InferqError:
            default = None
        versions = repo.all(name)
        # A parent's speed is measured beside each variant's (same run, same machine).
        parent_speed = {int(v.manifest.compression.parent_version or 0):
                        v.manifest.speed["parent_rows_per_s"] for v in versions
                        if "parent_rows_per_s" in v.manifest.speed}
        records += [_record(v, default, parent_speed) for v in versions]
    return records


def _show(repo: ModelRepository, names: list[str], as_json: bool = False) -> None:
    records = _records(repo, names)
    if as_json:
        print_json(records)
        return
    grid = Grid(["version", "variant", "runtime", "compression", "size", "quality vs fp32",
                 "rows/s", "speed vs fp32"], caption="* = what the bare name serves")
    for r in records:
        grid.add(*_cells(r))
    show(out, grid)


def models_build(
    names: Annotated[list[str] | None, typer.Argument(help="digits, minilm (default: all)")]
    = None,
    if_missing: Annotated[bool, typer.Option(help="skip a model that has a version")] = False,
) -> None:
    """Build the bundled models and every variant into INFERQ_MODEL_REPO, measured."""
    repo = _repo()
    bundled = worker_module("build.bundled")
    try:
        built = bundled.build_bundled(repo, names, if_missing=if_missing, say=say)
    except ValueError as exc:
        raise InferqError(str(exc)) from None
    if built.versions:
        _announce(repo, sorted({v.manifest.name for v in built.versions}))
        _show(repo, sorted({v.manifest.name for v in built.versions}))
        if not built.new:
            say("no new version: every artifact built is already published")
    else:
        say("nothing to build: every model already has a version")


def models_list(as_json: JsonOption = False) -> None:
    """Every model, version and variant: size, quality and speed against the fp32 parent."""
    repo = _repo()
    _show(repo, repo.names(), as_json)


def models_show(name: str, as_json: JsonOption = True) -> None:
    """One model's manifests as JSON, and which version the bare name serves (``--json``
    is accepted for symmetry: the output is JSON either way, uncoloured when piped)."""
    repo = _repo()
    ref = parse_model_ref(name)
    versions = [repo.resolve(ref)] if ref.variant or ref.version else repo.all(ref.name)
    data = {"default": repo.default(ref.name), "serves": repo.resolve(ref.name).key,
            "versions": [json.loads(v.manifest.model_dump_json(exclude={"reference_stats"}))
                         for v in versions]}
    if out.is_terminal:
        out.print_json(json.dumps(data))
    else:
        print_json(data)


def models_default(
    name: str,
    target: Annotated[str, typer.Argument(help="a variant (int8) or a version (@3)")],
) -> None:
    """Point the bare model name at a variant or a version; pointing back is a rollback.
    Running workers pick it up within seconds, without a restart."""
    repo = _repo()
    if target.startswith("@"):
        chosen = repo.set_default(name, version=parse_model_ref(f"{name}{target}").version)
    else:
        chosen = repo.set_default(name, variant=target)
    _announce(repo, [name])
    out.print(f"{name} now serves {chosen.key} ({chosen.manifest.variant})")


def compress(
    model_file: Path,
    calibration: Annotated[Path, typer.Option(help="rows like the model's input (.npy, …)")],
    method: Annotated[str, typer.Option(help="int8-dynamic | int8-static | fp16 | prune:0.5")],
    name: Annotated[str | None, typer.Option(help="model name in the repository")] = None,
    threads: Annotated[int, typer.Option(help="threads for the speed measurement")] = 1,
) -> None:
    """Compress your own ONNX or TorchScript model into a new version, with a report."""
    from producer.files.readers import read_chunks

    repo = _repo()
    tool = worker_module("build.compress")
    parent, version = tool.compress(model_file, calibration=calibration, method=method,
                                    repo_root=repo, name=name, threads=threads,
                                    read_table=read_chunks)
    _announce(repo, [version.manifest.name])
    _show(repo, [version.manifest.name])


def example_input(
    model: Annotated[str, typer.Argument(help="digits or minilm")],
    output: Annotated[Path, typer.Option(help="the file to write; its suffix picks the "
                                         "format (digits: .npy .csv .jsonl .parquet; "
                                         "minilm: .txt .jsonl .csv .parquet)")],
    rows: Annotated[int, typer.Option(help="rows to write (the set repeats)")] = 1_797,
) -> None:
    """Write an input file for a bundled model, to try `inferq score` on.

    digits: scikit-learn's digits images; minilm: the bundled sentences."""
    tool = worker_module("build.examples")
    try:
        written = tool.write_example(model, output, rows)
    except ValueError as exc:
        raise InferqError(str(exc)) from None
    say(f"wrote {written:,} {model} inputs to {output}")


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    models_app.command("build")(models_build)
    models_app.command("list")(models_list)
    models_app.command("show")(models_show)
    models_app.command("default")(models_default)
    app.command("compress")(compress)
    app.command("example-input")(example_input)
