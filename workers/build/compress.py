"""Compress a user's ONNX or TorchScript model into measured versions of the model repository.

``compress`` publishes the original file as an ``fp32`` parent (once per source file: a
later run finds it by the file's sha256) and the compressed model as a child version whose
manifest says how it was made, how close it stays to the parent on the calibration rows
and how fast both ran on this machine.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.repository import ModelRepository, ModelVersion, as_repository, sha256_file
from shared.schemas import Compression, Manifest, TensorSpec, check_model_name
from workers.build.compress_calibration import TableReader, npy_spec, read_calibration
from workers.build.compress_common import CompressError, Runtime, dtype_name, jit_load
from workers.build.compress_measure import measure
from workers.build.compress_ops import fp16, int8, prune_onnx, prune_torchscript
from workers.build.measure import torch_threads

__all__ = ["MEASURE_SECONDS", "METHODS", "CompressError", "Method", "Source", "compress",
           "load_source", "parse_method", "read_calibration", "sanitize_name"]

logger = logging.getLogger(__name__)

METHODS = ("int8-dynamic", "int8-static", "fp16", "prune:<fraction>")
VARIANTS = {"int8-dynamic": "int8", "int8-static": "int8", "fp16": "fp16", "prune": "pruned"}
ARTIFACTS = {"onnx": "model.onnx", "torchscript": "model.pt"}
ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth")
MEASURE_SECONDS = 1.0  # timed seconds per model for rows/s (best of 3 runs within it)


@dataclass(frozen=True)
class Method:
    kind: str  # int8-dynamic | int8-static | fp16 | prune
    fraction: float | None = None

    @property
    def variant(self) -> str:
        return VARIANTS[self.kind]

    def __str__(self) -> str:
        return self.kind if self.fraction is None else f"prune:{self.fraction:g}"


@dataclass(frozen=True)
class Source:
    path: Path
    runtime: Runtime
    sha256: str
    inputs: list[TensorSpec]  # ONNX: from the graph; TorchScript: empty (from calibration)
    arg_name: str = "input"  # TorchScript: forward's first argument


# ---------------------------------------------------------------------------- the entry point


def compress(model_file: Path, *, calibration: Path, method: str, repo_root: ModelRepository | Path,
             name: str | None = None, threads: int = 1,
             max_rows: int = 2000, read_table: TableReader | None = None
             ) -> tuple[ModelVersion, ModelVersion]:
    """Publish ``model_file`` (once) and its compressed form; return (parent, compressed).
    ``read_table`` reads .csv/.jsonl/.parquet calibration files (see compress_calibration)."""
    how = parse_method(method)
    if threads < 1 or max_rows < 1:
        raise CompressError(f"threads and max_rows must be at least 1, got {threads} and "
                            f"{max_rows}")
    source = load_source(Path(model_file))
    if source.runtime == "torchscript" and how.kind != "prune":
        raise CompressError(f"{source.path}: method {how} needs an ONNX model; a TorchScript "
                            "module supports only prune:<fraction> (export it to ONNX with "
                            "torch.onnx.export for int8 or fp16)")
    model_name = sanitize_name(source.path.stem if name is None else name)
    specs = source.inputs or [npy_spec(Path(calibration), source.arg_name)]
    rows = read_calibration(Path(calibration), specs, max_rows, read_table)
    repo = as_repository(repo_root)
    with tempfile.TemporaryDirectory(prefix="inferq-compress-") as tmp:
        out = Path(tmp) / ARTIFACTS[source.runtime]
        details = _compress_file(source, how, out, rows, Path(tmp))
        with torch_threads(threads if source.runtime == "torchscript" else None):
            report = measure(source.runtime, source.path, out, rows, threads,
                             MEASURE_SECONDS)  # read here, at the call: tests shorten it
        parent = _find_parent(repo, model_name, source)
        if parent is None:
            parent = _publish(repo, source.path, _manifest(
                model_name, source, specs, report.parent_outputs, variant="fp32",
                compression=Compression(method="none", details={
                    "source": str(source.path.resolve()), "source_sha256": source.sha256}),
                speed=report.parent_speed, notes=f"the original {source.path.name}"))
        details.update(calibration=str(Path(calibration).resolve()),
                       calibration_rows=len(next(iter(rows.values()))))
        child = _publish(repo, out, _manifest(
            model_name, source, specs, report.outputs, variant=how.variant,
            compression=Compression(method=str(how), parent_version=parent.manifest.version,
                                    details=details),
            quality=report.quality, speed=report.speed,
            notes=f"{how} of {parent.key}, made by inferq compress"))
    logger.info("compressed %s (%s) into %s: %s, %.2fx the parent's rows/s", source.path,
                parent.key, child.key, how, report.speed["speedup_vs_parent"])
    return parent, child


def parse_method(method: str) -> Method:
    """``int8-dynamic`` | ``int8-static`` | ``fp16`` | ``prune:F`` with 0 < F < 1."""
    text = method.strip().lower()
    if text.startswith("prune:"):
        raw = text.partition(":")[2]
        try:
            fraction = float(raw)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction < 1:  # also refuses nan
            raise CompressError(f"method {method!r}: the prune fraction must be a number "
                                "strictly between 0 and 1, e.g. prune:0.5")
        return Method("prune", fraction)
    if text in VARIANTS and text != "prune":
        return Method(text)
    raise CompressError(f"unknown compression method {method!r}; use one of: "
                        f"{', '.join(METHODS)}")


def sanitize_name(name: str) -> str:
    """Lowercase, other characters to '-', at most 64: ``My Model.v2`` -> ``my-model-v2``."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).lstrip("-_")[:64]
    try:
        return check_model_name(cleaned)
    except ValueError:
        raise CompressError(f"cannot make a model name from {name!r} (got {cleaned!r}); pass "
                            "a name of 1-64 lowercase letters, digits, '_' or '-'") from None


# ---------------------------------------------------------------------------- the source


def load_source(path: Path) -> Source:
    """The model file as an ONNX graph or a TorchScript module; anything else is refused."""
    if not path.exists():
        raise CompressError(f"model file {path} does not exist")
    if not path.is_file():
        raise CompressError(f"model file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return _onnx_source(path)
    if suffix in TORCHSCRIPT_SUFFIXES:
        return _torchscript_source(path)
    raise CompressError(f"{path}: expected an ONNX model (.onnx) or a TorchScript module "
                        f"(.pt, .pth), got a {suffix or 'file without extension'}")


def _onnx_source(path: Path) -> Source:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a file that is not ONNX
        raise CompressError(f"{path} is not a model: expected an ONNX file, but onnx cannot "
                            f"read it ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    if not graph.node or not graph.input or not graph.output:
        raise CompressError(f"{path} is not a model: expected an ONNX file, but it holds no "
                            "graph with nodes, inputs and outputs")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise CompressError(f"{path} keeps its weights in external data files, which "
                            "compress does not support; save the model as one file")
    weights = {t.name for t in graph.initializer}
    inputs = [_onnx_input(path, v) for v in graph.input if v.name not in weights]
    return Source(path, "onnx", sha256_file(path), inputs)


def _onnx_input(path: Path, value: Any) -> TensorSpec:
    import onnx

    tensor = value.type.tensor_type
    where = f"{path}: input {value.name!r}"
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        raise CompressError(f"{where} is not a tensor of known rank")
    dtype = dtype_name(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), where)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise CompressError(f"{where} has shape {dims or '()'}: its first dimension must be "
                            "the dynamic row axis (export with dynamic_axes={"
                            f"{value.name!r}: {{0: 'rows'}}}})")
    return TensorSpec(name=value.name, dtype=dtype, shape=dims)  # type: ignore[arg-type]


def _torchscript_source(path: Path) -> Source:
    try:
        module = jit_load(path)
    except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors...
        raise CompressError(f"{path} is not a model: expected a TorchScript module saved "
                            "with torch.jit.save (a state_dict or a pickled nn.Module will "
                            f"not do), but torch.jit.load failed ({exc})".split("\n")[0]
                            ) from None
    args = [a.name for a in module.forward.schema.arguments[1:]]
    if len(args) != 1:
        raise CompressError(f"{path}: forward takes {len(args)} inputs {args}; compress "
                            "handles TorchScript modules with exactly one input tensor")
    return Source(path, "torchscript", sha256_file(path), [], args[0])


# ---------------------------------------------------------------------------- compressing


def _compress_file(source: Source, how: Method, out: Path, rows: dict[str, np.ndarray],
                   work: Path) -> dict[str, Any]:
    """Write the compressed artifact to ``out``; return what to record about how."""
    if how.kind == "prune":
        assert how.fraction is not None
        if source.runtime == "torchscript":
            return prune_torchscript(source.path, out, how.fraction)
        return prune_onnx(source.path, out, how.fraction)
    if how.kind == "fp16":
        return fp16(source.path, out)
    return int8(source.path, out, rows if how.kind == "int8-static" else None, work)


# ---------------------------------------------------------------------------- publishing


def _find_parent(repo: ModelRepository, name: str, source: Source) -> ModelVersion | None:
    """The newest version published from this very file (same sha256), if any."""
    for version in reversed(repo.all(name)):
        compression = version.manifest.compression
        if (compression.method == "none" and version.manifest.runtime == source.runtime
                and compression.details.get("source_sha256") == source.sha256):
            logger.info("%s is already published as %s; reusing it as the parent",
                        source.path, version.key)
            return version
    return None


def _manifest(name: str, source: Source, inputs: list[TensorSpec], outputs: list[TensorSpec],
              **fields: Any) -> Manifest:
    return Manifest(name=name, version=1, task="custom", runtime=source.runtime,
                    artifact=ARTIFACTS[source.runtime], inputs=inputs, outputs=outputs, **fields)


def _publish(repo: ModelRepository, artifact: Path, manifest: Manifest) -> ModelVersion:
    with repo.staging(manifest.name) as staged:
        shutil.copyfile(artifact, staged / manifest.artifact)
        version = repo.publish(staged, manifest)
    logger.info("published %s (%s, %s)", version.key, manifest.variant,
                manifest.compression.method)
    return version
