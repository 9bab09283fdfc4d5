"""Text models: tokenize in the worker, group rows by token length, pad per group.

Rows of a batch are sorted by token count and run in groups of ``group_rows``, each
padded only to its own longest row, so a short sentence is not padded to the longest
sentence of the whole batch. On a CPU a group's rows run one after another anyway, so
padding is pure loss and small groups win; a GPU wants wide calls (``group_rows_for``).
Inputs longer than the manifest's ``max_length`` are truncated, and the row says so
(``truncated``), never silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.repository import ModelVersion
from workers.runtimes.base import PaddingStats, example_inputs
from workers.runtimes.onnx import ort_session

logger = logging.getLogger(__name__)

GPU_GROUP_ROWS = 64


def group_rows_for(threads: int, device: str) -> int:
    """Rows per model call. CPU: 8 per ORT thread (minilm int8, held-out sentences, rows/s
    at batch 32 with 1 thread: groups of 4 983, 8 925, 16 872, 32 726; with 2 threads at
    batch 64: 8 1,519, 16 1,586: a thread wants some rows of its own)."""
    if device.startswith("cuda"):
        return GPU_GROUP_ROWS
    cores = threads or os.cpu_count() or 1
    return min(GPU_GROUP_ROWS, max(4, 8 * cores))


class TextRuntime:
    def __init__(self, version: ModelVersion, *, threads: int, device: str = "cpu",
                 group_rows: int | None = None):
        from tokenizers import Tokenizer

        pre = version.manifest.preprocessing
        if not pre.tokenizer or not pre.max_length:
            raise ValueError(f"{version.key}: a text model needs preprocessing.tokenizer "
                             "and preprocessing.max_length in its manifest")
        self.version = version
        self.max_length = pre.max_length
        self.tokenizer = Tokenizer.from_file(str(version.path / pre.tokenizer))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.session = ort_session(version, threads, device)
        self.graph_inputs = {i.name for i in self.session.get_inputs()}
        self.output_names = [s.name for s in version.manifest.outputs]
        self.group_rows = group_rows or group_rows_for(threads, device)
        self.stats = PaddingStats()
        self.on_lengths: Callable[[np.ndarray], None] | None = None  # drift (workers/pool.py)

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in inputs[self.version.manifest.inputs[0].name]]
        encodings = self.tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        truncated = np.array([bool(e.overflowing) for e in encodings])
        order = np.argsort(lengths, kind="stable")
        outputs: dict[str, np.ndarray] = {}
        padded = 0
        for first in range(0, len(texts), self.group_rows):
            rows = order[first:first + self.group_rows]
            width = int(lengths[rows].max())
            padded += width * len(rows)
            feed = self._feed([encodings[i] for i in rows], width)
            values = self.session.run(self.output_names, feed)
            for name, value in zip(self.output_names, values, strict=True):
                if name not in outputs:
                    outputs[name] = np.empty((len(texts), *value.shape[1:]), value.dtype)
                outputs[name][rows] = value
        self.stats.record(int(lengths.sum()), padded, int(lengths.max()) * len(texts),
                          int(truncated.sum()))
        if self.on_lengths is not None:
            self.on_lengths(lengths)
        outputs["_truncated"] = truncated
        return outputs

    def _feed(self, encodings: list[Any], width: int) -> dict[str, np.ndarray]:
        ids = np.zeros((len(encodings), width), np.int64)
        mask = np.zeros((len(encodings), width), np.int64)
        types = np.zeros((len(encodings), width), np.int64)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
            types[i, :n] = e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v for k, v in feed.items() if k in self.graph_inputs}

    def warm_up(self, rows: int) -> None:
        self.run(example_inputs(self.version, min(rows, 64)))
        self.stats = PaddingStats()  # count real traffic only
