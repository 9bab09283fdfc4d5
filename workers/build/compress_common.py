"""What every ``compress`` module shares: its error, the row batching and the TorchScript loader.

It imports none of the other ``compress_*`` modules, so each of them can import it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared.errors import InferqError

MAX_BATCH = 128
SPEC_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32",
               "float64")

Runtime = Literal["onnx", "torchscript"]


class CompressError(InferqError):
    """The model file, method, calibration data or name cannot be used; the message says why."""


def dtype_name(dtype: np.dtype[Any], where: str) -> str:
    if dtype.name not in SPEC_DTYPES:
        raise CompressError(f"{where} has dtype {dtype}; compress handles numeric tensors "
                            f"({', '.join(SPEC_DTYPES)})")
    return dtype.name


def batches(rows: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    total = len(next(iter(rows.values())))
    for start in range(0, total, size):
        yield {k: v[start:start + size] for k, v in rows.items()}


def jit_load(path: Path) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        return torch.jit.load(str(path), map_location="cpu").eval()
