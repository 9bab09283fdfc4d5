"""Model runtimes: load once per process, warm up, then only ``run(batch)``."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from shared.repository import ModelVersion

logger = logging.getLogger(__name__)


class Runtime(Protocol):
    version: ModelVersion

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntime:
    """One ONNX Runtime session. ``run`` releases the GIL, so task threads keep decoding."""

    def __init__(self, version: ModelVersion, *, threads: int, providers: list[str] | None = None):
        import onnxruntime as ort

        self.version = version
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = providers or ["CPUExecutionProvider"]
        started = time.perf_counter()
        self.session = ort.InferenceSession(
            str(version.artifact), sess_options=options, providers=self.providers
        )
        self.output_names = [spec.name for spec in version.manifest.outputs]
        logger.info("loaded %s from %s with %s, %d threads in %.2fs", version.key,
                    version.artifact, self.session.get_providers(), threads,
                    time.perf_counter() - started)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values, strict=True))

    def warm_up(self, rows: int) -> None:
        """One call at the largest batch size, so the first job does not pay for allocation."""
        for n in (1, rows):
            self.run(example_inputs(self.version, n))


def example_inputs(version: ModelVersion, rows: int) -> dict[str, np.ndarray]:
    return {
        spec.name: np.zeros((rows, *[max(d, 1) for d in spec.row_shape]), dtype=spec.np_dtype)
        for spec in version.manifest.inputs
    }


def load_runtime(version: ModelVersion, *, threads: int) -> Runtime:
    kind = version.manifest.runtime
    if kind == "onnx":
        return OnnxRuntime(version, threads=threads)
    raise NotImplementedError(f"runtime {kind!r} of {version.key} is not supported yet")
