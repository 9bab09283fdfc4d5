"""Text inputs: one string per row from every text format; bad rows fail alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.bulk.chunks import array_chunks
from producer.files.readers import count_rows, read_chunks
from shared.errors import InputError
from shared.schemas import TensorSpec
from shared.validation import check_text_rows

TEXT = TensorSpec(name="text", dtype="string", shape=[-1])
SENTENCES = [f"sentence number {i}, with a comma" for i in range(7)]


def rows(path: Path, chunk_rows: int = 3) -> tuple[list[str], dict[int, str], list[int]]:
    texts, errors, sizes = [], {}, []
    for chunk in read_chunks(path, TEXT, chunk_rows):
        texts += list(chunk.data)
        errors.update({e.row: e.message for e in chunk.errors})
        sizes.append(chunk.rows)
    return texts, errors, sizes


def test_txt(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTENCES) + "\n\n")
    texts, errors, sizes = rows(path)
    assert texts == SENTENCES and errors == {} and sizes == [3, 3, 1]
    assert count_rows(path) == 7


def test_jsonl_strings_objects_and_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps(SENTENCES[0]), json.dumps({"text": SENTENCES[1]}), "{not json",
             json.dumps({"other": 1}), json.dumps(5), json.dumps("   ")]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    texts, errors, _ = rows(path)
    assert texts == SENTENCES[:2]
    assert sorted(errors) == [2, 3, 4, 5]
    assert "row 2" in errors[2] and "not valid JSON" in errors[2]
    assert "no key 'text'" in errors[3]
    assert "expected text, got int" in errors[4]
    assert "empty text" in errors[5]


def test_csv_named_column_with_quoted_commas(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\n" + "".join(f'{i},"{s}"\n' for i, s in enumerate(SENTENCES)))
    texts, errors, _ = rows(path)
    assert texts == SENTENCES and errors == {}


def test_parquet_string_column_with_a_null(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [*SENTENCES[:3], None, *SENTENCES[3:]]}), path,
                   row_group_size=2)
    texts, errors, sizes = rows(path)
    assert texts == SENTENCES and list(errors) == [3] and sizes == [3, 3, 2]


def test_unsupported_text_format(tmp_path: Path) -> None:
    path = tmp_path / "in.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(InputError, match="text inputs come from"):
        list(read_chunks(path, TEXT, 2))


def test_check_text_rows_labels_and_caps() -> None:
    data, keep, errors = check_text_rows(TEXT, ["ok", None, "x" * 100_001, "fine"],
                                         labels=np.array([10, 11, 12, 13]))
    assert list(data) == ["ok", "fine"] and list(keep) == [0, 3]
    assert [e.row for e in errors] == [11, 12]
    assert "exceeds" in errors[1].message


def test_array_chunks_of_text() -> None:
    chunks = list(array_chunks(TEXT, np.asarray(SENTENCES + [""]), 5))
    assert [c.rows for c in chunks] == [5, 3]
    assert chunks[1].errors[0].row == 7
