"""The minilm build: valid manifests, and int8/fp16 judged by re-embedding the held-out set
with the published artifacts here, not by trusting the figures the build wrote."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from shared.repository import ModelCorrupt, ModelRepository, ModelVersion
from shared.schemas import Manifest
from workers.build.minilm import (
    TARGETS,
    embed,
    load_sentences,
    reference_embeddings,
)

Built = tuple[Path, dict[str, ModelVersion]]


@pytest.fixture(scope="module")
def built(bundled_repo: Path) -> Built:
    """The session's build of every bundled model (``build_bundled``, which runs
    ``build_minilm`` and serves ``measured_default``): one minilm build per suite run."""
    repo = ModelRepository(bundled_repo)
    return bundled_repo, {v: repo.resolve(f"minilm:{v}") for v in ("fp32", "int8", "fp16")}


def embed_independently(version: ModelVersion, sentences: list[str], batch: int = 16
                        ) -> np.ndarray:
    """Tokenize with the published tokenizer.json as it is, batch by length, run ORT plainly."""
    tokenizer = Tokenizer.from_file(str(version.path / "tokenizer.json"))
    session = ort.InferenceSession(str(version.artifact), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = np.empty((len(sentences), 384), np.float32)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        ids = [e.ids for e in tokenizer.encode_batch([sentences[i] for i in rows])]
        width = max(map(len, ids))
        feed = {"input_ids": np.array([i + [0] * (width - len(i)) for i in ids], np.int64),
                "attention_mask": np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids],
                                           np.int64)}
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        out[rows] = session.run(["embedding"], {k: v for k, v in feed.items() if k in names})[0]
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def nearest(emb: np.ndarray) -> np.ndarray:
    sims = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.argmax(axis=1))


@pytest.fixture(scope="module")
def heldout(built: Built) -> dict[str, np.ndarray]:
    sentences = load_sentences("heldout")
    return {v: embed_independently(built[1][v], sentences) for v in ("fp32", "int8")}


def test_sentence_sets() -> None:
    heldout, calibration = load_sentences("heldout"), load_sentences("calibration")
    assert len(heldout) >= 500 and len(calibration) >= 100
    assert len(set(heldout)) == len(heldout) and len(set(calibration)) == len(calibration)
    assert not set(heldout) & set(calibration)
    words = [len(s.split()) for s in heldout]
    assert min(words) <= 3 and max(words) >= 50
    assert sum(s.endswith("?") for s in heldout) >= 50
    assert sum(bool(re.search(r"[^\x00-\x7f]", s)) for s in heldout) >= 20
    with pytest.raises(ValueError, match="unknown sentence set"):
        load_sentences("train")  # type: ignore[arg-type]


def test_manifests_validate(built: Built) -> None:
    _, versions = built
    assert set(versions) == {"fp32", "int8", "fp16"}
    calibration = len(load_sentences("calibration"))
    for variant, version in versions.items():
        manifest = Manifest.model_validate(json.loads((version.path / "manifest.json").read_text()))
        assert manifest.name == "minilm" and manifest.variant == variant
        assert manifest.task == "embedding"
        assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [("text", "string", [-1])]
        assert [(s.name, s.dtype, s.shape) for s in manifest.outputs] == [
            ("embedding", "float32", [-1, 384])]
        pre = manifest.preprocessing
        assert (pre.kind, pre.tokenizer, pre.max_length, pre.pooling, pre.normalize) == (
            "text", "tokenizer.json", 256, "mean", True)
        assert "input_ids, attention_mask, token_type_ids" in pre.description
        assert (version.path / "tokenizer.json").is_file()
        stats = manifest.reference_stats
        assert stats["kind"] == "token_lengths" and sum(stats["counts"]) == calibration
        assert len(stats["bins"]) == len(stats["counts"]) + 1
        assert manifest.size_bytes == version.artifact.stat().st_size
        assert manifest.speed["rows_per_s"] > 0 and manifest.speed["threads"] == 2
        if variant != "fp32":
            assert manifest.compression.parent_version == versions["fp32"].manifest.version
    assert versions["int8"].manifest.compression.method.startswith("int8-")
    assert versions["fp16"].manifest.compression.method == "fp16"


def test_fp32_matches_sentence_transformers(built: Built,
                                            heldout: dict[str, np.ndarray]) -> None:
    sentences = load_sentences("heldout")[::10]
    reference = reference_embeddings(sentences)
    assert cosines(reference, heldout["fp32"][::10]).min() >= 0.9999


def test_embed_agrees_with_an_independent_pipeline(built: Built,
                                                    heldout: dict[str, np.ndarray]) -> None:
    sentences = load_sentences("heldout")[:64]
    for variant in ("fp32", "int8"):
        ours = embed(built[1][variant], sentences)
        assert ours.shape == (64, 384) and ours.dtype == np.float32
        assert cosines(ours, heldout[variant][:64]).min() >= 0.99999


def test_int8_meets_quality_targets(built: Built, heldout: dict[str, np.ndarray]) -> None:
    fp32, int8 = built[1]["fp32"], built[1]["int8"]
    ratio = fp32.artifact.stat().st_size / int8.artifact.stat().st_size
    cos = cosines(heldout["fp32"], heldout["int8"])
    agreement = float(np.mean(nearest(heldout["fp32"]) == nearest(heldout["int8"])))
    print(f"\nint8 vs fp32 on {len(cos)} held-out sentences: {ratio:.2f}x smaller, cosine mean "
          f"{cos.mean():.5f} min {cos.min():.5f}, nn agreement {agreement:.4f}")
    assert ratio >= TARGETS["size_ratio"]
    assert cos.mean() >= TARGETS["mean_cosine"]
    assert agreement >= TARGETS["nn_agreement"]


def test_int8_is_batch_invariant(built: Built) -> None:
    sentences = load_sentences("heldout")[200:232]  # mixed lengths
    in_batch = embed(built[1]["int8"], sentences, batch=32)
    alone = embed(built[1]["int8"], sentences, batch=1)
    assert cosines(in_batch, alone).min() >= TARGETS["batch_invariance_min_cosine"]


def test_fp16_close_to_fp32(built: Built, heldout: dict[str, np.ndarray]) -> None:
    fp16 = embed_independently(built[1]["fp16"], load_sentences("heldout")[:48])
    assert fp16.dtype == np.float32
    assert cosines(heldout["fp32"][:48], fp16).min() >= 0.999


def test_long_input_is_truncated(built: Built) -> None:
    long = " ".join(f"word{i % 50} and" for i in range(200))  # 400 words
    version = built[1]["int8"]
    tokenizer = Tokenizer.from_file(str(version.path / "tokenizer.json"))
    assert len(tokenizer.encode(long).ids) == version.manifest.preprocessing.max_length == 256
    emb = embed(version, [long, long + " and then a different ending entirely"])
    assert emb.shape == (2, 384) and np.all(np.isfinite(emb))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3)
    assert cosines(emb[:1], emb[1:])[0] >= 0.99999  # the tail past 256 tokens is dropped


def test_sha256_verify(built: Built, tmp_path: Path) -> None:
    root, versions = built
    for version in versions.values():
        version.verify()
    copy = tmp_path / "minilm" / "1"
    shutil.copytree(versions["int8"].path, copy)
    artifact = copy / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(ModelCorrupt, match="sha256"):
        ModelRepository(tmp_path).load("minilm", 1).verify()
    with pytest.raises(ModelCorrupt):
        embed(ModelRepository(tmp_path).load("minilm", 1), ["hello"])


def test_resolve_variants(built: Built) -> None:
    root, versions = built
    repo = ModelRepository(root)
    for variant, version in versions.items():
        assert repo.resolve(f"minilm:{variant}").path == version.path


def test_default_as_decided(built: Built) -> None:
    root, versions = built
    int8 = versions["int8"].manifest
    met = int8.compression.details["targets_met"]
    assert set(met) == set(TARGETS)
    expected = "int8" if all(met.values()) else "fp32"
    repo = ModelRepository(root)
    assert repo.default("minilm") == {"variant": expected}
    assert repo.resolve("minilm").manifest.variant == expected
    if expected == "int8":
        assert int8.quality["batch_invariance_min_cosine"] >= 0.999
    print(f"\nminilm default: {expected}; int8 targets met: {met}\n"
          f"speed (2 threads, batch 32): int8 {int8.speed['rows_per_s']:.0f} rows/s vs fp32 "
          f"{int8.speed['parent_rows_per_s']:.0f} ({int8.speed['speedup_vs_parent']:.2f}x); "
          f"fp16 on CPU {versions['fp16'].manifest.speed['rows_per_s']:.0f} rows/s")
