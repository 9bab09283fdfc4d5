"""What every model runtime is: loaded once per process, warmed up, then only
``run(batch)``; example inputs for the warm-up, and padding counts for text models."""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np

from shared.repository import ModelVersion


class Runtime(Protocol):
    version: ModelVersion

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def warm_up(self, rows: int) -> None: ...


def example_inputs(version: ModelVersion, rows: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in version.manifest.inputs:
        if spec.dtype == "string":
            out[spec.name] = np.array(["warm up " * 8] * rows, dtype=object)
        else:
            shape = (rows, *[max(d, 1) for d in spec.row_shape])
            out[spec.name] = np.zeros(shape, dtype=spec.np_dtype)
    return out


class PaddingStats:
    """Tokens really used vs tokens computed, with and without length grouping."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens = self.padded = self.padded_ungrouped = self.truncated = 0

    def record(self, tokens: int, padded: int, ungrouped: int, truncated: int) -> None:
        with self.lock:
            self.tokens += tokens
            self.padded += padded
            self.padded_ungrouped += ungrouped
            self.truncated += truncated

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            saved = 1 - self.padded / self.padded_ungrouped if self.padded_ungrouped else 0.0
            return {"tokens": self.tokens, "padded_tokens": self.padded,
                    "padded_tokens_without_grouping": self.padded_ungrouped,
                    "padding_saved": round(saved, 4), "truncated_rows": self.truncated}
