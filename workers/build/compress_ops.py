"""The transformations ``compress`` applies: int8 quantization, fp16 conversion, pruning.

Each writes the compressed artifact to ``out`` and returns what to record about how.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from workers.build.compress_common import MAX_BATCH, CompressError, batches, jit_load

logger = logging.getLogger(__name__)


@contextmanager
def _quiet(what: str) -> Iterator[None]:
    """Converter warnings become debug lines: the report, not the console, says what matters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.debug("%s: %s: %s", what, w.category.__name__, w.message)


def int8(src: Path, out: Path, rows: dict[str, np.ndarray] | None,
         work: Path) -> dict[str, Any]:
    """Per-channel int8 weights; static (QDQ, calibrated activations) when given rows."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = work / "preprocessed.onnx"
    try:
        with _quiet("quant_pre_process"):
            quant_pre_process(str(src), str(model))
    except Exception as exc:  # symbolic shape inference fails on some graphs; it is optional
        logger.warning("quant_pre_process failed on %s (%s); quantizing it as it is", src, exc)
        model = src
    # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
    # ORT's u8s8 kernels add pairs of products in 16 bits, which saturate with full-range
    # weights: a toy MLP's logits fell to cosine 0.95 against fp32 on an AVX2-only EPYC,
    # 0.9999 with reduce_range. Where the artifact will run is not known when it is built.
    details: dict[str, Any] = {"per_channel": True, "weight_type": "QInt8",
                               "reduce_range": True, "preprocessed": model != src}
    if rows is None:
        with _quiet("quantize_dynamic"):
            quantize_dynamic(str(model), str(out), per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8)
        return details

    calibration = rows

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = batches(calibration, MAX_BATCH)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with _quiet("quantize_static"):
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QInt8)
    return details | {"format": "QDQ", "activation_type": "QInt8", "calibrate": "MinMax"}


def fp16(src: Path, out: Path) -> dict[str, Any]:
    """Float16 weights and compute; inputs and outputs stay as they were (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet("convert_float_to_float16"):
        converted = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(converted, str(out))
    return {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}


def _prune_array(values: np.ndarray, fraction: float) -> np.ndarray:
    """A copy with the ``fraction`` smallest-magnitude entries set to zero."""
    flat = values.reshape(-1).copy()
    k = int(fraction * flat.size)
    if k:
        flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
    return flat.reshape(values.shape)


def prune_onnx(src: Path, out: Path, fraction: float) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    zeros = total = tensors = 0
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype.kind != "f" or values.ndim < 2:
            continue
        pruned = _prune_array(values, fraction)
        init.CopyFrom(numpy_helper.from_array(pruned, init.name))
        zeros, total, tensors = zeros + int(np.sum(pruned == 0)), total + pruned.size, tensors + 1
    if not tensors:
        raise CompressError(f"{src}: no float initializer with 2 or more dimensions to prune")
    onnx.save(model, str(out))
    return _prune_details(fraction, zeros, total, tensors)


def prune_torchscript(src: Path, out: Path, fraction: float) -> dict[str, Any]:
    import torch

    module = jit_load(src)
    zeros = total = tensors = 0
    with torch.no_grad():
        for param in module.parameters():
            if not param.is_floating_point() or param.dim() < 2:
                continue
            pruned = _prune_array(param.detach().cpu().numpy(), fraction)
            param.copy_(torch.from_numpy(pruned))
            zeros, total = zeros + int(np.sum(pruned == 0)), total + pruned.size
            tensors += 1
    if not tensors:
        raise CompressError(f"{src}: no floating parameter with 2 or more dimensions to prune "
                            "(a frozen module keeps its weights as constants)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, str(out))
    return _prune_details(fraction, zeros, total, tensors)


def _prune_details(fraction: float, zeros: int, total: int, tensors: int) -> dict[str, Any]:
    return {"fraction": fraction, "sparsity": round(zeros / total, 6), "pruned_tensors": tensors,
            "pruned_values": total, "storage": "dense (zeros are stored, not skipped)"}
