"""The minilm build's yardsticks: sentence sets, tokenizing, comparing embeddings, timing.

Kept apart from the export and the int8 rewrite so each can be read on its own; everything
here judges a graph, nothing here changes one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared.errors import InferqError
from workers.runtimes.onnx import session_options

DIM = 384
DATA = Path(__file__).resolve().parent / "data"
LENGTH_BINS = [1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 257]


class BuildError(InferqError):
    """A build step produced something that does not match its reference."""


def load_sentences(kind: Literal["heldout", "calibration"]) -> list[str]:
    """The bundled sentence sets: ``heldout`` judges variants, ``calibration`` fits int8."""
    if kind not in ("heldout", "calibration"):
        raise ValueError(f"unknown sentence set {kind!r}: use 'heldout' or 'calibration'")
    text = (DATA / f"sentences_{kind}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(path: Path, max_length: int) -> Any:
    """A ``tokenizers`` tokenizer that truncates to ``max_length`` and does not pad."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def encode(tokenizer: Any, sentences: list[str], batch: int) -> list[dict[str, np.ndarray]]:
    """Graph feeds in order, each batch padded with 0 to its own longest sentence."""
    feeds = []
    for start in range(0, len(sentences), batch):
        encodings = tokenizer.encode_batch(sentences[start:start + batch])
        ids = np.zeros((len(encodings), max(len(e.ids) for e in encodings)), np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, 1
        feeds.append({"input_ids": ids, "attention_mask": mask,
                      "token_type_ids": np.zeros_like(ids)})
    return feeds


def run_feeds(session: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    out = [session.run(["embedding"], {k: v for k, v in f.items() if k in names})[0]
           for f in feeds]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, DIM), np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.argmax(axis=1))


def compare(parent: np.ndarray, child: np.ndarray) -> dict[str, float]:
    """Mean/min cosine of each row vs the parent's, and how often the nearest neighbour agrees."""
    cos = cosines(parent, child)
    agree = np.mean(nearest_neighbours(parent) == nearest_neighbours(child))
    return {"mean_cosine_vs_parent": round(float(cos.mean()), 6),
            "min_cosine_vs_parent": round(float(cos.min()), 6),
            "nn_agreement_vs_parent": round(float(agree), 4)}


def batch_invariance(session: Any, tokenizer: Any, sentences: list[str]) -> float:
    """Min cosine of each sentence embedded alone vs inside its batch of 32 mixed lengths."""
    in_batch = run_feeds(session, encode(tokenizer, sentences, 32))
    alone = run_feeds(session, encode(tokenizer, sentences, 1))
    return round(float(cosines(in_batch, alone).min()), 6)


def paired_rows_per_s(paths: list[Path], feeds: list[dict[str, np.ndarray]], *,
                      runtime_options: list[dict[str, Any]] | None = None, threads: int = 2,
                      repeats: int = 5) -> list[float]:
    """Rows/s of each model, timed alternately batch by batch so machine noise hits all alike.

    Each model runs with its own ``runtime_options`` (a manifest's, see workers.runtimes.onnx) and
    each batch's best of ``repeats`` counts. Where a session may spin, it is told to stop
    spinning when its run returns: otherwise an idle session's spinning threads would steal
    the running one's cores.
    """
    import onnxruntime as ort

    sessions, names = [], []
    for path, own_options in zip(paths, runtime_options or [{}] * len(paths), strict=True):
        measured = {**own_options}
        if measured.get("allow_spinning", True):
            measured.setdefault("force_spinning_stop", True)
        options, kwargs = session_options(threads, measured)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                       **kwargs)
        sessions.append(session)
        names.append({i.name for i in session.get_inputs()})
    own = [[{k: v for k, v in f.items() if k in n} for f in feeds] for n in names]
    for session, fs in zip(sessions, own, strict=True):
        for f in fs[:3]:
            session.run(None, f)
    best = np.full((len(paths), len(feeds)), np.inf)
    for _ in range(repeats):
        for b in range(len(feeds)):
            for m, session in enumerate(sessions):
                started = time.perf_counter()
                session.run(None, own[m][b])
                best[m, b] = min(best[m, b], time.perf_counter() - started)
    rows = sum(len(f["input_ids"]) for f in feeds)
    return [rows / float(t) for t in best.sum(axis=1)]


def token_length_stats(tokenizer: Any, sentences: list[str]) -> dict[str, Any]:
    """Histogram of token counts (after truncation) for drift monitoring.

    ``counts[i]`` counts lengths in ``[bins[i], bins[i+1])``; lengths include [CLS] and [SEP].
    """
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences)]
    counts, _ = np.histogram(lengths, bins=LENGTH_BINS)
    return {"kind": "token_lengths", "rows": len(lengths), "bins": LENGTH_BINS,
            "counts": [int(c) for c in counts], "mean": round(float(np.mean(lengths)), 2)}
