"""ONNX Runtime: sessions with the manifest's options and the device's providers, and
``OnnxRuntime`` for numeric inputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.repository import ModelVersion
from workers.runtimes.base import example_inputs

logger = logging.getLogger(__name__)


def providers_for(device: str) -> list[str]:
    """CUDA (TensorRT first when present) when this process was given a GPU and ORT has
    it, CPU otherwise (logged)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in available:
            # TensorRT first when this build has it: ORT gives it the subgraphs it can
            # run and the rest to CUDA, then CPU.
            trt = ["TensorrtExecutionProvider"] if "TensorrtExecutionProvider" in available \
                else []
            return [*trt, "CUDAExecutionProvider", "CPUExecutionProvider"]
        logger.warning("device %s asked for, but this onnxruntime has no CUDA provider "
                       "(providers: %s); running on the CPU", device, available)
    return ["CPUExecutionProvider"]


# Manifest ``runtime_options`` understood here; other keys are logged and ignored (they only
# ever change speed, never results).
RUNTIME_OPTIONS = {
    "disabled_optimizers": "graph optimizers to skip, e.g. ['SkipLayerNormFusion']",
    "allow_spinning": "false: intra-op threads sleep instead of spin-waiting for work",
    "force_spinning_stop": "true: threads stop spinning as soon as a run() returns",
}

_CONFIG_KEYS = {"allow_spinning": "session.intra_op.allow_spinning",
                "force_spinning_stop": "session.force_spinning_stop"}


def session_options(threads: int, runtime_options: Mapping[str, Any] | None = None
                    ) -> tuple[Any, dict[str, Any]]:
    """``SessionOptions`` for ``threads`` and a manifest's ``runtime_options``, and the extra
    ``InferenceSession`` keyword arguments they need."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    kwargs: dict[str, Any] = {}
    # Intra-op threads sleep between runs unless a manifest asks otherwise: a worker's
    # Celery threads, the batcher and other processes share these cores, and spin-waiting
    # after every small call burned ~5 ms of CPU per single-row job (measured, digits,
    # 2 threads, jobs over HTTP).
    options.add_session_config_entry(_CONFIG_KEYS["allow_spinning"], "0")
    for key, value in (runtime_options or {}).items():
        if key == "disabled_optimizers":
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"runtime option disabled_optimizers must be a list of "
                                 f"names, not {value!r}")
            kwargs["disabled_optimizers"] = list(value)
        elif key in ("allow_spinning", "force_spinning_stop"):
            if not isinstance(value, bool):
                raise ValueError(f"runtime option {key} must be true or false, not {value!r}")
            options.add_session_config_entry(_CONFIG_KEYS[key], "1" if value else "0")
        else:
            logger.warning("unknown runtime option %s=%r ignored (known: %s)", key, value,
                           ", ".join(RUNTIME_OPTIONS))
    return options, kwargs


def ort_session(version: ModelVersion, threads: int, device: str = "cpu") -> Any:
    """A session for ``version`` with the runtime options its manifest was measured with."""
    import onnxruntime as ort

    runtime_options = version.manifest.runtime_options
    options, kwargs = session_options(threads, runtime_options)
    started = time.perf_counter()
    session = ort.InferenceSession(str(version.artifact), sess_options=options,
                                   providers=providers_for(device), **kwargs)
    logger.info("loaded %s (%s) from %s with %s, %d threads%s in %.2fs", version.key,
                version.manifest.variant, version.artifact, session.get_providers(), threads,
                f", options {runtime_options}" if runtime_options else "",
                time.perf_counter() - started)
    return session


class OnnxRuntime:
    """One ONNX Runtime session. ``run`` releases the GIL, so task threads keep decoding."""

    def __init__(self, version: ModelVersion, *, threads: int, device: str = "cpu"):
        self.version = version
        self.session = ort_session(version, threads, device)
        self.output_names = [spec.name for spec in version.manifest.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values, strict=True))

    def warm_up(self, rows: int) -> None:
        """One call at the largest batch size, so the first job does not pay for allocation."""
        for n in (1, rows):
            self.run(example_inputs(self.version, n))


