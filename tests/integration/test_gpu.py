"""The GPU path: skipped cleanly where no CUDA device (and CUDA build of ONNX Runtime) is."""

from __future__ import annotations

import numpy as np
import pytest

from shared.repository import ModelRepository

pytestmark = pytest.mark.gpu


def _cuda_ready() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_ready(), reason="no CUDA execution provider on this machine")
def test_minilm_fp16_runs_on_the_gpu(bundled_repo):
    from workers.runtimes.text import TextRuntime

    version = ModelRepository(bundled_repo).resolve("minilm:fp16")
    runtime = TextRuntime(version, threads=1, device="cuda")
    assert runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    out = runtime.run({"text": np.array(["a sentence on the GPU"] * 8, dtype=object)})
    assert out["embedding"].shape == (8, 384)
