"""Execution-provider choice: CUDA only where this onnxruntime has it, else CPU, logged."""

from __future__ import annotations

import logging

import pytest

from workers.runtimes.onnx import providers_for


def test_cpu_device_uses_the_cpu() -> None:
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_cuda_without_a_cuda_build_falls_back_and_says_why(caplog, monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING):
        assert providers_for("cuda:0") == ["CPUExecutionProvider"]
    assert "no CUDA provider" in caplog.text and "running on the CPU" in caplog.text


def test_cuda_when_available(monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CUDA"])
def test_device_setting_is_checked(bad: str) -> None:
    from shared.errors import ConfigError
    from shared.settings import load_settings

    with pytest.raises(ConfigError, match="INFERQ_DEVICE"):
        load_settings(device=bad)


def test_tensorrt_first_when_present(monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for("cuda:0") == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                       "CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]
