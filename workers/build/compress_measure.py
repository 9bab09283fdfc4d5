"""Running the parent and the compressed model on the calibration rows: outputs, quality
metrics against the parent, and rows/s of both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from shared.schemas import TensorSpec
from workers.build.compress_common import (
    MAX_BATCH,
    CompressError,
    Runtime,
    batches,
    dtype_name,
    jit_load,
)
from workers.build.measure import ort_session, rows_per_s, speed_record

Call = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Report:
    parent_outputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quality: dict[str, float]
    parent_speed: dict[str, float]
    speed: dict[str, float]


def _runner(runtime: Runtime, path: Path, threads: int) -> tuple[Call, list[Any] | None]:
    """A function running the artifact on named inputs, and its declared output shapes."""
    if runtime == "onnx":
        session = ort_session(path, threads)
        declared = [o.shape if isinstance(o.shape, list) else None
                    for o in session.get_outputs()]
        return (lambda inputs: list(session.run(None, inputs))), declared
    import torch

    module = jit_load(path)

    def call(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()])
        values = out if isinstance(out, (tuple, list)) else (out,)
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise CompressError(f"{path}: forward returned {type(out).__name__}; compress "
                                "needs a tensor or a tuple of tensors")
        return [v.cpu().numpy() for v in values]

    return call, None


def _run_all(call: Call, rows: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
    try:
        parts = [call(batch) for batch in batches(rows, MAX_BATCH)]
    except CompressError:
        raise
    except Exception as exc:  # the runtime's last line says which input or op failed
        lines = [line for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
        inputs = {k: f"{v.dtype} {v.shape}" for k, v in rows.items()}
        raise CompressError(f"{where}: running it on the calibration rows ({inputs}) failed: "
                            f"{lines[-1].strip()}") from None
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


def measure(runtime: Runtime, src: Path, out: Path, rows: dict[str, np.ndarray],
            threads: int, min_seconds: float) -> Report:
    """Outputs, quality vs the parent ``src`` on every calibration row, rows/s of both (each
    timed for ``min_seconds``)."""
    n = len(next(iter(rows.values())))
    batch = min(MAX_BATCH, n)
    first = next(batches(rows, batch))
    results = []
    for path, where in ((src, str(src)), (out, "the compressed model")):
        call, declared = _runner(runtime, path, threads)
        values = _run_all(call, rows, where)
        specs = _output_specs(runtime, path, declared, values, n)
        rps = rows_per_s(partial(call, first), batch, min_seconds=min_seconds)
        results.append((values, specs, rps))
    (parent_values, parent_specs, parent_rps), (values, specs, rps) = results
    quality = _quality(parent_values, values, [s.name for s in specs])
    quality.update(size_ratio=round(out.stat().st_size / src.stat().st_size, 6),
                   calibration_rows=float(n))
    speed = speed_record(rps, threads=threads, batch=batch) | {
        "parent_rows_per_s": round(parent_rps, 1), "speedup_vs_parent": round(rps / parent_rps, 3)}
    return Report(parent_specs, specs, quality,
                  speed_record(parent_rps, threads=threads, batch=batch), speed)


def _output_specs(runtime: Runtime, path: Path, declared: list[Any] | None,
                  values: list[np.ndarray], rows: int) -> list[TensorSpec]:
    """Names and dims from the graph where it says; dtype and rank from what came out."""
    if runtime == "onnx":
        import onnx

        names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    else:
        names = ["output"] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
    specs = []
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        where = f"{path}: output {name!r}"
        if value.ndim == 0 or value.shape[0] != rows:
            raise CompressError(f"{where} has shape {value.shape} for {rows} input rows; "
                                "compress needs one output row per input row")
        dims = declared[i] if declared and declared[i] and len(declared[i]) == value.ndim \
            else list(value.shape)
        shape = [-1] + [d if isinstance(d, int) and d > 0 else -1 for d in dims[1:]]
        specs.append(TensorSpec(name=name, dtype=dtype_name(value.dtype, where),  # type: ignore[arg-type]
                                shape=shape))
    return specs


def _quality(parent: list[np.ndarray], child: list[np.ndarray],
             names: list[str]) -> dict[str, float]:
    """Per output: cosine (mean, min), max |diff|, top-1 agreement; headline = the worst."""
    quality: dict[str, float] = {}
    for name, a, b in zip(names, parent, child, strict=True):
        if a.shape != b.shape:
            raise CompressError(f"output {name!r} changed shape: parent {a.shape}, "
                                f"compressed {b.shape}")
        if a.dtype.kind != "f":
            same = (a == b).reshape(len(a), -1).all(axis=1)
            quality[f"{name}.agreement"] = round(float(same.mean()), 6)
            continue
        a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cosine = _row_cosines(a2, b2)
        finite = np.isfinite(a2) & np.isfinite(b2)
        quality[f"{name}.mean_cosine_vs_parent"] = round(float(cosine.mean()), 6)
        quality[f"{name}.min_cosine_vs_parent"] = round(float(cosine.min()), 6)
        quality[f"{name}.max_abs_diff"] = float(np.abs(a2 - b2)[finite].max(initial=0.0))
        if a.ndim == 2:
            top1 = a.argmax(axis=1) == b.argmax(axis=1)
            quality[f"{name}.top1_agreement"] = round(float(top1.mean()), 6)
    for key in ("mean_cosine_vs_parent", "top1_agreement", "agreement"):
        found = [v for k, v in quality.items() if k.endswith(f".{key}")]
        if found:
            quality[key] = min(found)
    diffs = [v for k, v in quality.items() if k.endswith(".max_abs_diff")]
    if diffs:
        quality["max_abs_diff"] = max(diffs)
    return quality


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair; a row holding NaN/inf scores 1 if identical, else 0."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.where(norms > 0, np.einsum("ij,ij->i", a, b) / np.where(norms > 0, norms, 1),
                          np.all(a == b, axis=1).astype(np.float64))
    same = np.all((a == b) | (np.isnan(a) & np.isnan(b)), axis=1)
    return np.where(np.isfinite(cosine), np.clip(cosine, -1.0, 1.0), same.astype(np.float64))
