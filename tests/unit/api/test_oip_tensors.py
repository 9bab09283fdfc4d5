"""Open Inference Protocol tensors -> inferq inputs: JSON and binary, numbers and text."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from api.oip import Tensor, _inputs
from shared.errors import InputError
from shared.schemas import TensorSpec

IMAGE = [TensorSpec(name="image", dtype="float32", shape=[-1, 4])]
TEXT = [TensorSpec(name="text", dtype="string", shape=[-1])]


def test_json_and_binary_numbers_give_the_same_rows() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    as_json = _inputs(IMAGE, [Tensor(name="image", datatype="FP32", shape=[2, 4],
                                     data=x.reshape(-1).tolist())], b"")
    as_binary = _inputs(IMAGE, [Tensor(name="image", datatype="FP32", shape=[2, 4],
                                       parameters={"binary_data_size": 32})], x.tobytes())
    np.testing.assert_array_equal(as_json["image"], x)
    np.testing.assert_array_equal(as_binary["image"], x)


def test_text_rows_as_json_strings_or_length_prefixed_bytes() -> None:
    words = ["a cat", "ünïcode"]
    raw = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    assert _inputs(TEXT, [Tensor(name="text", datatype="BYTES", shape=[2], data=words)],
                   b"") == {"text": words}
    assert _inputs(TEXT, [Tensor(name="text", datatype="BYTES", shape=[2, 1],
                                 parameters={"binary_data_size": len(raw)})],
                   raw) == {"text": words}


@pytest.mark.parametrize(("tensor", "raw", "says"), [
    (Tensor(name="img", datatype="FP32", shape=[1, 4], data=[0] * 4), b"", "no input 'img'"),
    (Tensor(name="image", datatype="INT64", shape=[1, 4], data=[0] * 4), b"", "takes FP32"),
    (Tensor(name="image", datatype="FP32", shape=[2, 4], data=[0] * 4), b"", "4 values"),
    (Tensor(name="image", datatype="FP32", shape=[1, 4], data=["x"] * 4), b"", "FP32 values"),
    (Tensor(name="image", datatype="FP32", shape=[1, 4], parameters={"binary_data_size": 16}),
     b"\0" * 8, "runs past"),
    (Tensor(name="image", datatype="FP32", shape=[1, 4], parameters={"binary_data_size": 8}),
     b"\0" * 8, "8 bytes for 4"),
    (Tensor(name="image", datatype="FP32", shape=[1, 4], data=[0] * 4), b"\0", "after the last"),
    (Tensor(name="image", datatype="FP32", shape=[-1, 4], data=[0] * 4), b"", "negative"),
    (Tensor(name="image", datatype="FP32", shape=[1, 4]), b"", "no data"),
])
def test_each_bad_tensor_is_one_input_error(tensor: Tensor, raw: bytes, says: str) -> None:
    with pytest.raises(InputError, match=says):
        _inputs(IMAGE, [tensor], raw)


def test_bad_text_bytes_are_one_input_error() -> None:
    for raw in (b"\x05\0\0\0ab", b"\x02\0", b"\x02\0\0\0\xff\xfe"):
        with pytest.raises(InputError, match="text"):
            _inputs(TEXT, [Tensor(name="text", datatype="BYTES", shape=[1],
                                  parameters={"binary_data_size": len(raw)})], raw)
