"""Model runtimes: load once per process, warm up, then only ``run(batch)``.

``OnnxRuntime`` (onnx.py) runs numeric inputs through ONNX Runtime; ``TorchScriptRuntime``
(torchscript.py) runs a TorchScript file with torch; ``TextRuntime`` (text.py) tokenizes
strings in the worker, groups rows of similar token length so short sentences are not
padded to the longest, and reports which rows were truncated. ``load_runtime`` picks one
from the manifest.
"""

from __future__ import annotations

from shared.repository import ModelVersion
from workers.runtimes.base import PaddingStats, Runtime
from workers.runtimes.onnx import OnnxRuntime
from workers.runtimes.text import TextRuntime
from workers.runtimes.torchscript import TorchScriptRuntime

__all__ = ["PaddingStats", "Runtime", "load_runtime"]


def load_runtime(version: ModelVersion, *, threads: int, device: str = "cpu") -> Runtime:
    manifest = version.manifest
    if manifest.preprocessing.kind == "text":
        return TextRuntime(version, threads=threads, device=device)
    if manifest.runtime == "onnx":
        return OnnxRuntime(version, threads=threads, device=device)
    if manifest.runtime == "torchscript":
        return TorchScriptRuntime(version, threads=threads, device=device)
    raise NotImplementedError(f"runtime {manifest.runtime!r} of {version.key} is not supported")
