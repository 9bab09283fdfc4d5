"""Every bundled variant scored through a real worker, judged on held-out data."""

from __future__ import annotations

import numpy as np
import pytest

from shared.repository import ModelRepository
from tests.conftest import client_for

pytestmark = pytest.mark.integration


@pytest.fixture
def variant_env(redis_env, bundled_repo):
    return {**redis_env, "INFERQ_MODEL_REPO": str(bundled_repo)}


@pytest.fixture
def variant_worker(variant_env, start_worker):
    return start_worker(variant_env, "--models", "digits,minilm")


def test_digits_variants_through_the_queue(variant_env, variant_worker):
    from workers.build.digits import split

    _, x_test, _, y_test = split(0)
    client = client_for(variant_env)
    accuracy = {}
    for variant in ("fp32", "int8", "pruned", "distilled", "torchscript"):
        result = client.submit_many(f"digits:{variant}", x_test, chunk_rows=128).results(60)
        assert result.ok.all(), result.errors
        accuracy[variant] = float(np.mean(result.outputs["label"] == y_test))
    print("\nheld-out accuracy through the queue:", accuracy)
    assert accuracy["int8"] >= accuracy["fp32"] - 0.005
    assert accuracy["pruned"] >= accuracy["fp32"] - 0.01
    assert accuracy["distilled"] >= 0.97
    assert accuracy["torchscript"] == accuracy["fp32"]
    # The bare name serves the repository's default, which the build chose from figures.
    default = ModelRepository(variant_env["INFERQ_MODEL_REPO"]).resolve("digits")
    res = client.wait(client.submit("digits", x_test[0]).id, timeout=30)
    assert res.version == default.manifest.version


def _nn_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose nearest other row is the same under both embeddings."""
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -2)
    np.fill_diagonal(sb, -2)
    return float(np.mean(sa.argmax(1) == sb.argmax(1)))


def test_minilm_int8_through_the_queue(variant_env, variant_worker):
    from workers.build.minilm import load_sentences

    sentences = load_sentences("heldout")
    client = client_for(variant_env)
    emb = {}
    for variant in ("fp32", "int8", "fp16"):
        result = client.submit_many(f"minilm:{variant}", sentences, chunk_rows=64).results(300)
        assert result.ok.all(), result.errors
        emb[variant] = result.outputs["embedding"]
    assert np.sum(emb["fp32"] * emb["fp16"], axis=1).min() >= 0.999
    cosines = np.sum(emb["fp32"] * emb["int8"], axis=1)
    nn = _nn_agreement(emb["fp32"], emb["int8"])
    print(f"\nminilm int8 vs fp32 through the queue: mean cos {cosines.mean():.4f} "
          f"(min {cosines.min():.4f}), nn agreement {nn:.3f} on {len(sentences)} sentences")
    assert len(sentences) >= 500
    assert cosines.mean() >= 0.995 and nn >= 0.97
    stats = client.app.control.broadcast("inferq_stats", reply=True, timeout=5)
    per_version = next(iter(stats[0].values()))
    text = [s for key, s in per_version.items() if key.startswith("minilm@")]
    saved = max(s["padding_saved"] for s in text)
    print(f"padding saved by grouping rows of similar length: {saved:.1%}")
    assert saved > 0.2


def test_served_defaults_are_batch_invariant(variant_env, variant_worker):
    """A row's output does not depend on which rows share its model call: 24 rows each
    alone (one job at a time) equal the same rows inside 128-row chunks of other rows."""
    from workers.build.digits import split
    from workers.build.minilm import load_sentences

    client = client_for(variant_env)
    _, x_test, _, _ = split(0)
    texts = load_sentences("heldout")[:256]
    for model, rows, output in (("digits", x_test[:256], "probabilities"),
                                ("minilm", texts, "embedding")):
        batched = client.submit_many(model, rows, chunk_rows=128).results(120)
        alone = np.stack([client.submit(model, rows[i]).result(60)[output][0]
                          for i in range(0, 240, 10)])
        in_batch = batched.outputs[output][0:240:10]
        if model == "digits":
            np.testing.assert_array_equal(alone.argmax(1), in_batch.argmax(1))
            worst = float(np.abs(alone - in_batch).max())
            print(f"\ndigits (default variant) alone vs in a batch: max |diff| {worst:.2e}")
            assert worst <= 1e-5
        else:
            worst = float(np.sum(alone * in_batch, axis=1).min())
            print(f"minilm (default variant) alone vs in a batch: min cosine {worst:.6f}")
            assert worst >= 0.9999


def test_long_text_is_truncated_and_says_so(variant_env, variant_worker):
    client = client_for(variant_env)
    job = client.submit("minilm", "word " * 2000)
    res = client.wait(job.id, timeout=60)
    assert res.status.value == "succeeded" and res.truncated == [0]
    assert res.outputs["embedding"].shape == (1, 384)
    short = client.wait(client.submit("minilm", "a short sentence").id, timeout=60)
    assert short.truncated == []


def test_score_a_text_file_in_order(variant_env, variant_worker, tmp_path):
    import pyarrow.parquet as pq

    from tests.conftest import run_cli

    lines = ["the first line", "word " * 400, "", "a third, shorter one", "last"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "emb.parquet"
    proc = run_cli(["score", "--model", "minilm:int8", "-i", str(src), "-o", str(out),
                    "--no-progress", "--stall-timeout", "120"], variant_env)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out).to_pydict()
    assert table["row"] == [0, 1, 2, 3]  # the blank line is not a row
    assert table["truncated"] == [False, True, False, False]
    assert all(e is None for e in table["error"])
    assert all(abs(np.linalg.norm(v) - 1) < 1e-3 for v in table["embedding"])
