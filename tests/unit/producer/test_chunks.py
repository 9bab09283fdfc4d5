"""Chunks of a bulk job: bad rows kept out, worker results spread back over input rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from producer.bulk.chunks import Chunk, array_chunks, chunk_rows_for, merge
from shared.schemas import Manifest, TensorSpec

IMAGE = TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])
OUTPUTS = [TensorSpec(name="probabilities", dtype="float32", shape=[-1, 10]),
           TensorSpec(name="label", dtype="int64", shape=[-1])]
NAN_ROWS = (1, 5, 9)


def images(rows: int, nan_rows: tuple[int, ...] = ()) -> np.ndarray:
    """Row i is all i (so a row can be recognised after slicing), NaN in ``nan_rows``."""
    arr = np.repeat(np.arange(rows, dtype=np.float32), 64).reshape(rows, 1, 8, 8)
    for i in nan_rows:
        arr[i, 0, 2, 3] = np.nan
    return arr


def chunks_of(rows: int, chunk_rows: int, nan_rows: tuple[int, ...] = ()) -> list[Chunk]:
    return list(array_chunks(IMAGE, images(rows, nan_rows), chunk_rows))


def worker_value(labels: list[int], ok: list[bool] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a worker returns for the rows it was sent (the chunk's valid rows)."""
    n = len(labels)
    probs = np.zeros((n, 10), np.float32)
    probs[np.arange(n), labels] = 1.0
    return {"model": "digits", "version": 1, "rows": n,
            "outputs": {"probabilities": probs, "label": np.array(labels, np.int64)},
            "ok": np.array(ok if ok is not None else [True] * n), "errors": errors or [],
            "batch_rows": [n]}


# -- array_chunks ----------------------------------------------------------------------------
def test_array_chunks_splits_into_chunk_rows_with_nan_rows_as_errors() -> None:
    chunks = chunks_of(10, 4, NAN_ROWS)
    assert [(c.index, c.start, c.rows) for c in chunks] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert [c.keep.tolist() for c in chunks] == [[0, 2, 3], [0, 2, 3], [0]]
    # Errors name absolute input rows, not positions within the chunk.
    assert [[e.row for e in c.errors] for c in chunks] == [[1], [5], [9]]
    for c in chunks:
        for e in c.errors:
            assert e.field == "image"
            assert f"row {e.row}" in e.message and "NaN" in e.message
    # The data holds the valid rows only, in order, cast to the spec.
    got = [c.data[:, 0, 0, 0].tolist() for c in chunks]
    assert got == [[0, 2, 3], [4, 6, 7], [8]]
    assert all(c.data.dtype == np.float32 and c.data.shape[1:] == (1, 8, 8) for c in chunks)


def test_array_chunks_of_clean_rows_keeps_every_row() -> None:
    chunks = chunks_of(5, 5)
    assert len(chunks) == 1
    assert chunks[0].keep.tolist() == [0, 1, 2, 3, 4] and chunks[0].errors == []
    np.testing.assert_array_equal(chunks[0].data, images(5))


def test_array_chunks_of_no_rows_yields_nothing() -> None:
    assert chunks_of(0, 4) == []


# -- merge -----------------------------------------------------------------------------------
def test_merge_all_rows_valid() -> None:
    chunk = chunks_of(8, 4)[1]
    res = merge(chunk, OUTPUTS, worker_value([7, 1, 2, 9]))
    assert (res.index, res.start, res.rows) == (1, 4, 4)
    assert res.outputs["label"].tolist() == [7, 1, 2, 9]
    assert res.outputs["probabilities"].shape == (4, 10)
    assert res.outputs["probabilities"].argmax(axis=1).tolist() == [7, 1, 2, 9]
    assert res.ok.tolist() == [True] * 4
    assert res.errors == {}


def test_merge_spreads_a_subset_and_maps_worker_errors_to_absolute_rows() -> None:
    chunk = chunks_of(8, 4, nan_rows=(5,))[1]  # rows 4..7; row 5 dropped by the producer
    assert chunk.keep.tolist() == [0, 2, 3]
    # The worker got rows 4, 6, 7 and failed its second row (index 1 = input row 6).
    value = worker_value([7, 8, 9], ok=[True, False, True], errors=[
        {"index": 1, "row": 6, "field": None, "message": "row 6: model refused"}])
    res = merge(chunk, OUTPUTS, value)
    assert res.outputs["label"].tolist() == [7, 0, 8, 9]
    assert res.outputs["label"].dtype == np.int64
    probs = res.outputs["probabilities"]
    assert probs.shape == (4, 10) and probs.dtype == np.float32
    assert probs[1].tolist() == [0.0] * 10
    assert res.ok.tolist() == [True, False, False, True]
    assert set(res.errors) == {5, 6}
    assert "NaN" in res.errors[5]
    assert res.errors[6] == "row 6: model refused"


def test_merge_an_exception_fails_every_valid_row_and_keeps_producer_errors() -> None:
    chunk = chunks_of(8, 4, nan_rows=(5,))[1]
    res = merge(chunk, OUTPUTS, ValueError("boom"))
    assert res.ok.tolist() == [False] * 4
    assert set(res.errors) == {4, 5, 6, 7}
    assert "NaN" in res.errors[5]
    for row in (4, 6, 7):
        assert res.errors[row] == "ValueError: boom"
    assert res.outputs["label"].tolist() == [0] * 4
    assert res.outputs["probabilities"].shape == (4, 10)


@pytest.mark.parametrize("value", [None, "lost"], ids=["none", "text"])
def test_merge_a_non_dict_value_fails_the_valid_rows(value: object) -> None:
    chunk = chunks_of(4, 4)[0]
    res = merge(chunk, OUTPUTS, value)
    assert res.ok.tolist() == [False] * 4
    assert set(res.errors) == {0, 1, 2, 3}
    assert all(type(value).__name__ in m for m in res.errors.values())


def test_merge_a_chunk_with_no_valid_rows() -> None:
    chunk = chunks_of(6, 3, nan_rows=(3, 4, 5))[1]
    assert chunk.keep.tolist() == [] and len(chunk.data) == 0
    res = merge(chunk, OUTPUTS, {})  # what bulk records for a chunk it never sends
    assert (res.start, res.rows) == (3, 3)
    assert res.ok.tolist() == [False] * 3
    assert sorted(res.errors) == [3, 4, 5]
    assert all("NaN" in m for m in res.errors.values())
    # Outputs keep the manifest's shapes and dtypes, all zero: nothing was computed.
    assert res.outputs["label"].dtype == np.int64 and res.outputs["label"].shape == (3,)
    assert res.outputs["probabilities"].dtype == np.float32
    assert res.outputs["probabilities"].shape == (3, 10)
    assert not res.outputs["label"].any() and not res.outputs["probabilities"].any()


def manifest_taking(*inputs: TensorSpec) -> Manifest:
    return Manifest(name="m", version=1, inputs=list(inputs), outputs=OUTPUTS)


@pytest.mark.parametrize(("spec", "rows"), [
    (IMAGE, 4096),  # 256 bytes a row -> 1 MiB
    (TensorSpec(name="x", dtype="float32", shape=[-1, 10]), 16_384),  # capped
    (TensorSpec(name="x", dtype="uint8", shape=[-1, 3, 224, 224]), 16),  # at least 16
    (TensorSpec(name="x", dtype="float32", shape=[-1, 3, 100]), 512),  # 1200 B: floor 2**k
    (TensorSpec(name="x", dtype="float32", shape=[-1, -1, 64]), 4096),  # dynamic axis as 1
    (TensorSpec(name="text", dtype="string", shape=[-1]), 1024),
])
def test_chunk_rows_follow_the_bytes_of_a_row(spec: TensorSpec, rows: int) -> None:
    assert chunk_rows_for(manifest_taking(spec)) == rows


def test_chunk_rows_count_every_input_and_a_setting_wins() -> None:
    two = manifest_taking(IMAGE, TensorSpec(name="mask", dtype="float32", shape=[-1, 1, 8, 8]))
    assert chunk_rows_for(two) == 2048
    assert chunk_rows_for(two, 300) == 300


def test_on_sqs_chunks_and_jobs_fit_its_message_limit() -> None:
    from producer.bulk.chunks import SQS_CHUNK_BYTES, check_fits, chunk_budget
    from shared.errors import InputError
    from shared.settings import load_settings

    sqs = load_settings(broker_url="sqs://", result_backend="redis://127.0.0.1:6379/12")
    redis = load_settings(broker_url="redis://127.0.0.1:6379/12")
    assert chunk_budget(sqs) == SQS_CHUNK_BYTES and chunk_budget(redis) == 1 << 20
    assert chunk_rows_for(manifest_taking(IMAGE), budget=SQS_CHUNK_BYTES) == 512
    wide = TensorSpec(name="x", dtype="float32", shape=[-1, 48_000])  # 192 KB a row
    assert chunk_rows_for(manifest_taking(wide), budget=SQS_CHUNK_BYTES) == 1  # no floor
    text = TensorSpec(name="text", dtype="string", shape=[-1])
    assert chunk_rows_for(manifest_taking(text), budget=SQS_CHUNK_BYTES) == 128
    big = {"image": images(600)}  # 153,600 bytes
    check_fits(redis, big)
    with pytest.raises(InputError, match=r"inputs: 153,600 bytes of input, over the 128 KiB"):
        check_fits(sqs, big)
    check_fits(sqs, {"image": images(512)})
