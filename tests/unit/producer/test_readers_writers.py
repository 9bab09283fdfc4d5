"""Readers stream validated chunks of every input format; writers write ordered results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.files.readers import Chunk, count_rows, read_chunks
from producer.files.writers import open_writer
from shared.errors import InputError
from shared.schemas import TensorSpec

SPEC = TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])
OUTPUTS = [TensorSpec(name="probabilities", dtype="float32", shape=[-1, 10]),
           TensorSpec(name="label", dtype="int64", shape=[-1])]
FORMATS = ["npy", "csv", "jsonl", "parquet", "parquet-columns"]


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64), dtype=np.float32)


def _write_input(path: Path, fmt: str, rows: np.ndarray, *, row_group: int | None = None
                 ) -> Path:
    """``rows`` (n, 64) in the given format; returns the file."""
    if fmt == "npy":
        np.save(path / "in.npy", rows.reshape(-1, 1, 8, 8))
        return path / "in.npy"
    if fmt == "csv":
        lines = [",".join(f"x{j}" for j in range(64))]
        lines += [",".join(repr(float(v)) for v in row) for row in rows]
        (path / "in.csv").write_text("\n".join(lines) + "\n")
        return path / "in.csv"
    if fmt == "jsonl":
        lines = [json.dumps({"image": row.reshape(1, 8, 8).tolist()}) if i % 2 else
                 json.dumps(row.tolist()) for i, row in enumerate(rows)]
        (path / "in.jsonl").write_text("\n".join(lines) + "\n")
        return path / "in.jsonl"
    if fmt == "parquet":
        column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 64)
        table = pa.table({"image": column})
    else:
        table = pa.table({f"x{j}": rows[:, j] for j in range(64)})
    pq.write_table(table, path / "in.parquet", row_group_size=row_group)
    return path / "in.parquet"


def _gather(chunks: list[Chunk]) -> np.ndarray:
    return np.concatenate([c.data for c in chunks]) if chunks else np.empty((0, 1, 8, 8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path: Path, fmt: str) -> None:
    rows = _rows(23)
    path = _write_input(tmp_path, fmt, rows, row_group=7)
    chunks = list(read_chunks(path, SPEC, 10))
    assert [(c.index, c.start, c.rows) for c in chunks] == [(0, 0, 10), (1, 10, 10), (2, 20, 3)]
    for c in chunks:
        assert c.data.dtype == np.float32 and c.data.shape == (c.rows, 1, 8, 8)
        assert c.keep.dtype == np.int64 and c.keep.tolist() == list(range(c.rows))
        assert c.errors == []
    np.testing.assert_array_equal(_gather(chunks).reshape(-1, 64), rows)


@pytest.mark.parametrize("fmt", FORMATS)
def test_count_rows(tmp_path: Path, fmt: str) -> None:
    path = _write_input(tmp_path, fmt, _rows(17))
    assert count_rows(path) == 17


def test_count_rows_csv_without_header_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("\n1,2\n\n  \n3,4\r\n5,6")
    assert count_rows(path) == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_boundaries_do_not_depend_on_skip_chunks(tmp_path: Path, fmt: str) -> None:
    rows = _rows(53)
    path = _write_input(tmp_path, fmt, rows, row_group=9)
    full = list(read_chunks(path, SPEC, 8))
    skipped = list(read_chunks(path, SPEC, 8, skip_chunks=frozenset({0, 2, 3, 6})))
    assert [(c.index, c.start, c.rows) for c in full] == \
        [(c.index, c.start, c.rows) for c in skipped]
    assert sum(c.rows for c in full) == 53
    for a, b in zip(full, skipped, strict=True):
        if b.index not in (0, 2, 3, 6):
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.keep, b.keep)


def test_csv_bad_cell_is_one_row_error_naming_row_and_column(tmp_path: Path) -> None:
    rows = _rows(12)
    lines = [",".join(f"px{j}" for j in range(64))]
    lines += [",".join(str(float(v)) for v in row) for row in rows]
    cells = lines[1 + 5].split(",")
    cells[3] = "abc"
    lines[1 + 5] = ",".join(cells)
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")

    chunks = list(read_chunks(path, SPEC, 8))
    first = chunks[0]
    assert [e.row for e in first.errors] == [5]
    message = first.errors[0].message
    assert "row 5" in message and "px3" in message and "'abc'" in message
    assert first.keep.tolist() == [0, 1, 2, 3, 4, 6, 7]
    np.testing.assert_array_equal(first.data.reshape(-1, 64), rows[[0, 1, 2, 3, 4, 6, 7]])
    assert chunks[1].errors == [] and chunks[1].keep.tolist() == [0, 1, 2, 3]


def test_csv_without_header_names_column_index(tmp_path: Path) -> None:
    rows = [",".join(["1"] * 64), ",".join(["1"] * 10 + ["x"] + ["1"] * 53)]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    (chunk,) = read_chunks(path, SPEC, 10)
    assert chunk.rows == 2 and chunk.keep.tolist() == [0]
    assert "row 1" in chunk.errors[0].message and "column 10" in chunk.errors[0].message


def test_csv_row_with_too_few_values(tmp_path: Path) -> None:
    rows = [",".join(["0.5"] * 64), ",".join(["0.5"] * 60), ",".join(["0.5"] * 64)]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    (chunk,) = read_chunks(path, SPEC, 10)
    assert chunk.keep.tolist() == [0, 2]
    (error,) = chunk.errors
    assert error.row == 1
    assert "row 1" in error.message and "64" in error.message and "got 60" in error.message


def test_csv_header_of_wrong_width_is_refused_up_front(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="header has 3 columns, expected 64"):
        read_chunks(path, SPEC, 10)


def test_jsonl_bad_json_line_and_blank_lines(tmp_path: Path) -> None:
    rows = _rows(4)
    lines = [json.dumps(rows[0].tolist()), "", "[1, 2,", json.dumps(rows[1].tolist()),
             "   ", json.dumps({"input": rows[2].tolist()}), json.dumps([1.0, 2.0])]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert count_rows(path) == 5
    (chunk,) = read_chunks(path, SPEC, 10)
    assert chunk.rows == 5
    assert chunk.keep.tolist() == [0, 2, 3]
    assert [e.row for e in chunk.errors] == [1, 4]
    assert "row 1" in chunk.errors[0].message and "JSON" in chunk.errors[0].message
    assert "row 4" in chunk.errors[1].message and "(1, 8, 8)" in chunk.errors[1].message
    np.testing.assert_array_equal(chunk.data.reshape(-1, 64), rows[:3])


def test_jsonl_integers_are_narrowed_with_a_range_check(tmp_path: Path) -> None:
    spec = TensorSpec(name="pixels", dtype="uint8", shape=[-1, 4])
    path = tmp_path / "in.jsonl"
    path.write_text("[1, 2, 3, 4]\n{\"pixels\": [5, 6, 7, 300]}\n[0, 0, 0, 255]\n")
    (chunk,) = read_chunks(path, spec, 10)
    assert chunk.data.dtype == np.uint8 and chunk.data.tolist() == [[1, 2, 3, 4], [0, 0, 0, 255]]
    assert [e.row for e in chunk.errors] == [1] and "out of range" in chunk.errors[0].message


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_row_is_a_row_error(tmp_path: Path, fmt: str) -> None:
    rows = _rows(6)
    rows[2, 7] = np.nan
    rows[4, 0] = np.inf
    path = _write_input(tmp_path, fmt, rows)
    (chunk,) = read_chunks(path, SPEC, 10)
    assert chunk.keep.tolist() == [0, 1, 3, 5]
    assert [e.row for e in chunk.errors] == [2, 4]
    assert all("NaN or infinity" in e.message for e in chunk.errors)


def test_parquet_nulls_and_wrong_lengths_are_row_errors(tmp_path: Path) -> None:
    good = [0.25] * 64
    table = pa.table({"image": pa.array([good, None, good[:5], good[:63] + [None], good],
                                        pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "in.parquet")
    (chunk,) = read_chunks(tmp_path / "in.parquet", SPEC, 10)
    assert chunk.keep.tolist() == [0, 4]
    assert [e.row for e in chunk.errors] == [1, 2, 3]
    assert "null" in chunk.errors[0].message and "got 5" in chunk.errors[1].message


def test_parquet_null_cell_names_its_column(tmp_path: Path) -> None:
    columns = {f"x{j}": pa.array([1.0, 2.0, 3.0], pa.float32()) for j in range(64)}
    columns["x9"] = pa.array([1.0, None, 3.0], pa.float32())
    pq.write_table(pa.table(columns), tmp_path / "in.parquet")
    (chunk,) = read_chunks(tmp_path / "in.parquet", SPEC, 10)
    assert chunk.keep.tolist() == [0, 2]
    assert "row 1" in chunk.errors[0].message and "'x9'" in chunk.errors[0].message


def test_npy_with_wrong_row_shape_raises_naming_expected_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", np.zeros((5, 8, 9), np.float32))
    with pytest.raises(InputError, match=r"expected .*\(N, 1, 8, 8\).*got shape \(5, 8, 9\)"):
        read_chunks(tmp_path / "in.npy", SPEC, 10)


def test_npy_flat_rows_are_accepted(tmp_path: Path) -> None:
    rows = _rows(3)
    np.save(tmp_path / "in.npy", rows.astype(np.float64))
    (chunk,) = read_chunks(tmp_path / "in.npy", SPEC, 10)
    np.testing.assert_array_equal(chunk.data.reshape(-1, 64), rows)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_chunks(tmp_path / "nope.csv", SPEC, 10)
    (tmp_path / "in.txt").write_text("1,2\n")
    with pytest.raises(InputError, match=r"\.npy, \.csv, \.jsonl, \.parquet"):
        read_chunks(tmp_path / "in.txt", SPEC, 10)


# ---------------------------------------------------------------------------- writers


def _results(start: int, n: int, failed: set[int]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                            dict[int, str]]:
    probs = np.random.default_rng(start).random((n, 10), dtype=np.float32)
    labels = probs.argmax(axis=1).astype(np.int64)
    ok = np.array([start + i not in failed for i in range(n)])
    probs[~ok], labels[~ok] = 0, 0
    errors = {r: f"row {r}, field 'image': contains NaN or infinity" for r in failed
              if start <= r < start + n}
    return {"probabilities": probs, "label": labels}, ok, errors


def _read_back(path: Path) -> list[dict[str, object]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_writer_one_row_per_input_row_in_order(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    writer = open_writer(path, OUTPUTS)
    failed = {3, 11}
    expected = []
    for start, n in [(0, 8), (8, 8), (16, 5)]:
        outputs, ok, errors = _results(start, n, failed)
        writer.write(start, outputs, ok, errors)
        expected.append((outputs, ok))
    assert (tmp_path / f"out{suffix}.partial").exists() and not path.exists()
    writer.close()
    assert path.exists() and not (tmp_path / f"out{suffix}.partial").exists()

    back = _read_back(path)
    assert [int(r["row"]) for r in back] == list(range(21))
    probs = np.concatenate([o["probabilities"] for o, _ in expected])
    labels = np.concatenate([o["label"] for o, _ in expected])
    for r, record in enumerate(back):
        if r in failed:
            assert f"row {r}" in str(record["error"])
            assert record["label"] in (None, "")
            continue
        assert record["error"] in (None, "")
        assert int(record["label"]) == labels[r]  # type: ignore[call-overload]
        got = ([float(record[f"probabilities_{j}"]) for j in range(10)]  # type: ignore[arg-type]
               if suffix == ".csv" else record["probabilities"])
        np.testing.assert_array_equal(np.asarray(got, np.float32), probs[r])


def test_parquet_writer_schema(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "out.parquet", OUTPUTS)
    writer.write(0, *_results(0, 4, {1}))
    writer.close()
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.names == ["row", "probabilities", "label", "error"]
    assert schema.field("probabilities").type == pa.list_(pa.float32(), 10)
    assert schema.field("label").type == pa.int64()


def test_writer_unknown_extension_and_out_of_order(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.parquet, \.csv, \.jsonl"):
        open_writer(tmp_path / "out.xlsx", OUTPUTS)
    writer = open_writer(tmp_path / "out.jsonl", OUTPUTS)
    writer.write(0, *_results(0, 4, set()))
    with pytest.raises(ValueError, match="in order"):
        writer.write(2, *_results(2, 4, set()))
    writer.close()


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_rows_read_in_order_whatever_the_memory_order(tmp_path, order):
    values = np.random.default_rng(0).random((1000, 64)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, np.asarray(values, order=order))
    spec = TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])
    got = np.concatenate([c.data.reshape(len(c.data), -1) for c in read_chunks(path, spec, 300)])
    np.testing.assert_array_equal(got, values)
