"""Input rows: the bundled digits images and held-out sentences, tiled to any count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def base_rows(name: str) -> np.ndarray:
    """Every distinct row of the model's bundled set (digits: float32 (1797, 1, 8, 8))."""
    if name == "digits":
        from workers.build.digits import load_digits_data

        images, _ = load_digits_data()
        return images
    if name == "minilm":
        from workers.build.minilm import load_sentences

        sentences = load_sentences("heldout")
        out = np.empty(len(sentences), dtype=object)
        out[:] = sentences
        return out
    raise ValueError(f"no bench data for model {name!r}")


def tiled(base: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(base))
    return np.concatenate([base] * reps)[:n]


def json_rows(base: np.ndarray) -> list[Any]:
    """Rows as a hand-written Celery client would send them with the JSON serializer."""
    if base.dtype == object:
        return [str(v) for v in base]
    return [row.ravel().tolist() for row in base]


def write_digits_npy(path: Path, rows: int, block: int = 65_536) -> Path:
    """A ``rows``-row digits .npy written block by block (the bench never holds it all)."""
    base = base_rows("digits")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(rows, *base.shape[1:]))
    for start in range(0, rows, block):
        n = min(block, rows - start)
        out[start:start + n] = tiled(np.roll(base, -(start % len(base)), axis=0), n)
    out.flush()
    del out
    return path
