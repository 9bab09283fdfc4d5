"""``inferq example-input``: an input file for a bundled model, from the data its build
uses (scikit-learn's digits images, the bundled sentences), so the README's commands run
as pasted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

FORMATS = {"digits": (".npy", ".csv", ".jsonl", ".parquet"),
           "minilm": (".txt", ".jsonl", ".csv", ".parquet")}


def write_example(model: str, path: Path, rows: int) -> int:
    """Write ``rows`` inputs of ``model`` to ``path`` (its suffix picks the format; the
    data repeats past what the set holds); -> rows written."""
    if model not in FORMATS:
        raise ValueError(f"model: no example input for {model!r}; bundled: "
                         f"{', '.join(FORMATS)}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS[model]:
        raise ValueError(f"output: {model} inputs are written as "
                         f"{', '.join(FORMATS[model])}, not {suffix or '(none)'!r}")
    if rows < 1:
        raise ValueError(f"rows: must be at least 1, not {rows}")
    if model == "digits":
        from workers.build.digits import load_digits_data

        images = np.resize(load_digits_data()[0], (rows, 1, 8, 8))  # tiled
        _write_images(images, path, suffix)
    else:
        from workers.build.minilm_eval import load_sentences

        sentences = load_sentences("heldout")
        _write_texts([sentences[i % len(sentences)] for i in range(rows)], path, suffix)
    return rows


def _write_images(images: np.ndarray, path: Path, suffix: str) -> None:
    flat = images.reshape(len(images), -1)
    if suffix == ".npy":
        np.save(path, images)
    elif suffix == ".csv":
        np.savetxt(path, flat, fmt="%g", delimiter=",")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in flat.tolist()))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"image": flat.tolist()}), path)


def _write_texts(texts: list[str], path: Path, suffix: str) -> None:
    if suffix == ".txt":
        path.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text"])
            writer.writerows([t] for t in texts)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
