"""Calibration rows for ``compress``: read from .npy/.npz/.csv/.jsonl/.parquet and checked
against the model's input specs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import InputError
from shared.schemas import TensorSpec
from shared.validation import check_rows
from workers.build.compress_common import CompressError, dtype_name


def npy_spec(path: Path, name: str) -> TensorSpec:
    """A TorchScript input's spec, from the calibration array (the file cannot say)."""
    if path.suffix.lower() != ".npy":
        raise CompressError(f"calibration {path}: a TorchScript model's input is described "
                            "by its calibration data; give one .npy array of rows x ...")
    arr = _load_array(path)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise CompressError(f"calibration {path}: expected an array of rows, got shape "
                            f"{arr.shape}")
    dtype = dtype_name(arr.dtype, f"calibration {path}")
    return TensorSpec(name=name, dtype=dtype, shape=[-1, *arr.shape[1:]])  # type: ignore[arg-type]


# Reads a table file (.csv/.jsonl/.parquet) as chunks with ``data`` and ``errors``: the
# producer's readers (``producer.files.readers.read_chunks``), passed in by ``inferq
# compress`` so the worker side never imports the producer.
TableReader = Callable[[Path, TensorSpec, int], Iterable[Any]]


def read_calibration(path: Path, specs: list[TensorSpec], max_rows: int,
                     read_table: TableReader | None = None) -> dict[str, np.ndarray]:
    """Up to ``max_rows`` rows per input, checked against the model's input specs."""
    if not path.is_file():
        raise CompressError(f"calibration file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            missing = [s.name for s in specs if s.name not in npz.files]
            if missing:
                raise CompressError(f"calibration {path}: no array for input(s) {missing}; "
                                    f"it holds {npz.files}, the model takes "
                                    f"{[s.name for s in specs]}")
            arrays = {s.name: np.asarray(npz[s.name][:max_rows]) for s in specs}
    elif len(specs) > 1:
        raise CompressError(f"calibration {path}: the model takes {len(specs)} inputs "
                            f"{[s.name for s in specs]}; give a .npz with one array per "
                            "input name")
    elif suffix == ".npy":
        arrays = {specs[0].name: np.asarray(_load_array(path)[:max_rows])}
    else:
        return {specs[0].name: _read_rows(path, specs[0], max_rows, read_table)}
    rows = {s.name: _checked(path, s, arrays[s.name]) for s in specs}
    counts = {name: len(arr) for name, arr in rows.items()}
    if len(set(counts.values())) != 1:
        raise CompressError(f"calibration {path}: inputs have different row counts {counts}")
    return rows


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CompressError(f"calibration {path}: not a readable .npy array ({exc})") from None


def _checked(path: Path, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    want, got = spec.row_shape, arr.shape[1:]
    fits = arr.ndim == len(spec.shape) and all(w in (-1, g)
                                               for w, g in zip(want, got, strict=False))
    same_size = -1 not in want and arr.ndim >= 1 and math.prod(got) == math.prod(want)
    if not (fits or same_size) or len(arr) == 0:
        raise CompressError(f"calibration {path}: input {spec.name!r} expects rows of shape "
                            f"{_show(want)}, got rows of shape {got} (array {arr.shape})")
    try:
        data, _, errors = check_rows(spec, arr)
    except InputError as exc:
        raise CompressError(f"calibration {path}: {exc}") from None
    if errors:
        raise CompressError(f"calibration {path}: {len(errors)} bad row(s), the first: "
                            f"{errors[0].message}")
    return np.array(data, order="C")  # a copy: writable, and no longer tied to the mmap


def _read_rows(path: Path, spec: TensorSpec, max_rows: int, read_table: TableReader | None
               ) -> np.ndarray:
    """.csv / .jsonl / .parquet through ``read_table``, stopping at ``max_rows``."""
    if read_table is None:
        raise CompressError(f"calibration {path}: give a .npy or .npz array here (reading "
                            f"{path.suffix} files needs inferq's readers: `inferq compress`)")
    blocks: list[np.ndarray] = []
    try:
        for chunk in read_table(path, spec, min(max_rows, 1024)):
            if chunk.errors:
                raise CompressError(f"calibration {path}: {chunk.errors[0].message}")
            blocks.append(chunk.data)
            if sum(map(len, blocks)) >= max_rows:
                break
    except InputError as exc:
        raise CompressError(f"calibration {path}: {exc}") from None
    if not blocks or not sum(map(len, blocks)):
        raise CompressError(f"calibration {path}: no rows")
    return np.concatenate(blocks)[:max_rows]


def _show(shape: tuple[int, ...]) -> str:
    dims = ["any" if d == -1 else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
