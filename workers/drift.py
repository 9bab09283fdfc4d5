"""Input drift: how far what a worker sees has moved from the model's reference data.

Each model version's manifest carries ``reference_stats`` from its training or calibration
data (``workers/build``): per-feature histograms for numeric inputs (bin edges at the
training deciles, plus a bin each for values below and above anything seen in training,
and the share of rows in each bin), a token-length histogram for text.
A worker bins what it sees the same way, into counts that decay with a half-life of
``window_rows`` rows, and scores the difference with the Population Stability Index,
``PSI = sum((seen - expected) * ln(seen / expected))`` per feature, averaged over features.
Rules of thumb used here and in ``docs/ops.md``: under 0.1 no shift, 0.1-0.25 a moderate
shift worth watching, over ``DRIFT_THRESHOLD`` (0.25) drift.

Numeric rows are sampled (at most ``SAMPLE_ROWS`` per message) so a bulk job pays a few
microseconds per message; text lengths come free from the tokenizer the runtime runs anyway.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

DRIFT_THRESHOLD = 0.25
WATCH_THRESHOLD = 0.1
SAMPLE_ROWS = 16  # numeric rows observed per message at most
MIN_ROWS = 200  # no score before this many rows were seen
_EPS = 1e-4  # share given to an empty bin (PSI is undefined at 0)


def histogram_reference(x: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """``reference_stats`` for numeric rows: per feature, bin edges at the deciles
    (repeated values merge bins) plus one bin below the training minimum and one above the
    maximum (values never seen in training: a pixel always dark that lights up), and the
    share of ``x`` in each bin; mean and std too."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    edges, probs = [], []
    for column in flat.T:
        deciles = np.quantile(column, np.linspace(0, 1, bins + 1)[1:-1])
        above = column.max() + 1e-3 * max(1.0, abs(column.max()))
        # rounded as stored, so the shares are those of the edges a worker will use
        inner = np.unique(np.round(np.concatenate([[column.min()], deciles, [above]]), 6))
        counts = np.bincount(np.searchsorted(inner, column, side="right"),
                             minlength=len(inner) + 1)
        edges.append([float(e) for e in inner])
        probs.append([round(float(c) / len(column), 6) for c in counts])
    return {"kind": "histograms", "rows": len(flat), "edges": edges, "probs": probs,
            "mean": [round(float(v), 4) for v in flat.mean(axis=0)],
            "std": [round(float(v), 4) for v in flat.std(axis=0)]}


def psi(expected: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """PSI per row of two (features, bins) share arrays (rows sum to 1)."""
    e = np.maximum(expected, _EPS)
    s = np.maximum(seen, _EPS)
    return np.sum((s - e) * np.log(s / e), axis=-1)  # type: ignore[no-any-return]


class DriftMonitor:
    """Decaying binned counts of one model version's inputs, against its reference."""

    def __init__(self, edges: np.ndarray, expected: np.ndarray, *, kind: str,
                 window_rows: int = 5000, labels: list[str] | None = None):
        self.kind = kind
        self.edges = edges  # (features, bins - 1), padded with +inf
        self.expected = expected  # (features, bins)
        self.features, self.bins = expected.shape
        self.decay = math.log(2) / window_rows  # per row
        self.labels = labels or [str(i) for i in range(self.features)]
        self.counts = np.zeros_like(expected)
        self.rows = 0
        self._lock = threading.Lock()

    @classmethod
    def from_reference(cls, stats: dict[str, Any], **kw: Any) -> DriftMonitor | None:
        """A monitor for a manifest's ``reference_stats``; None when it has none usable."""
        kind = stats.get("kind")
        if kind == "histograms":
            width = max(len(p) for p in stats["probs"])
            edges = np.full((len(stats["edges"]), width - 1), np.inf)
            expected = np.zeros((len(stats["probs"]), width))
            for f, (inner, probs) in enumerate(zip(stats["edges"], stats["probs"],
                                                   strict=True)):
                edges[f, :len(inner)] = inner
                expected[f, :len(probs)] = probs
            return cls(edges, expected / expected.sum(axis=1, keepdims=True), kind=kind, **kw)
        if kind == "token_lengths":
            inner = np.asarray(stats["bins"][1:-1], dtype=np.float64)[None, :]
            counts = np.asarray(stats["counts"], dtype=np.float64)[None, :]
            return cls(inner, counts / counts.sum(), kind=kind, labels=["token_length"], **kw)
        return None

    def observe(self, values: np.ndarray) -> None:
        """Rows of features (numeric, sampled here) or token lengths (text)."""
        if self.kind == "token_lengths":
            rows = np.asarray(values, dtype=np.float64).reshape(-1, 1)
        else:
            flat = np.asarray(values).reshape(len(values), -1)
            if flat.shape[1] != self.features or not len(flat):
                return
            step = max(1, len(flat) // SAMPLE_ROWS)
            rows = flat[::step][:SAMPLE_ROWS].astype(np.float64)
        # bin of each value = how many inner edges it is >= to (padding edges are +inf)
        index = (rows[:, :, None] >= self.edges[None, :, :]).sum(axis=2)
        flat_index = (np.arange(self.features)[None, :] * self.bins + index).ravel()
        new = np.bincount(flat_index, minlength=self.features * self.bins)
        with self._lock:
            self.counts *= math.exp(-self.decay * len(rows))
            self.counts += new.reshape(self.features, self.bins)
            self.rows += len(rows)

    def state(self) -> dict[str, Any]:
        """Counts and rows seen (workers' states add up: see ``merge_score``)."""
        with self._lock:
            return {"kind": self.kind, "rows": self.rows, "counts": self.counts.tolist(),
                    "expected": self.expected.tolist(), "labels": self.labels}

    def score(self) -> float | None:
        with self._lock:
            if self.rows < MIN_ROWS:
                return None
            counts = self.counts.copy()
        return float(np.mean(psi(self.expected, counts / counts.sum(axis=1, keepdims=True))))


def report(states: list[dict[str, Any]], top: int = 5) -> dict[str, Any]:
    """One model version's drift from the states of one or more workers."""
    if not states:
        return {"rows": 0, "score": None, "verdict": "no data", "features": []}
    counts = np.sum([np.asarray(s["counts"]) for s in states], axis=0)
    expected = np.asarray(states[0]["expected"])
    rows = sum(int(s["rows"]) for s in states)
    if rows < MIN_ROWS or not counts.sum():
        return {"rows": rows, "score": None, "verdict": f"under {MIN_ROWS} rows seen",
                "features": []}
    per_feature = psi(expected, counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12))
    score = float(per_feature.mean())
    verdict = ("drift" if score > DRIFT_THRESHOLD else "watch" if score > WATCH_THRESHOLD
               else "ok")
    worst = np.argsort(per_feature)[::-1][:top]
    labels = states[0]["labels"]
    return {"rows": rows, "score": round(score, 4), "verdict": verdict,
            "features": [{"feature": labels[i], "psi": round(float(per_feature[i]), 4)}
                         for i in worst]}
