"""``compress``: a user's ONNX / TorchScript model in, a measured parent + child version out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from shared.repository import ModelRepository, ModelVersion
from workers.build import compress as compress_module
from workers.build.compress import CompressError, compress, sanitize_name

ONNX_METHODS = ("int8-dynamic", "int8-static", "fp16", "prune:0.5")
VARIANT = {"int8-dynamic": "int8", "int8-static": "int8", "fp16": "fp16", "prune:0.5": "pruned"}


@pytest.fixture(autouse=True, scope="module")
def _short_timing() -> object:
    """Speed is measured for real, just briefly: the tests check fields, not figures."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compress_module, "MEASURE_SECONDS", 0.05)
        yield


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "Toy MLP.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
        torch.onnx.export(_mlp(), (torch.zeros(2, 16),), str(path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                          dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "rows.npy"
    np.save(path, np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def built(toy_onnx: Path, calibration: Path,
          repo_root: Path) -> dict[str, tuple[ModelVersion, ModelVersion]]:
    """Every ONNX method on the same source, into one repository."""
    return {m: compress(toy_onnx, calibration=calibration, method=m, repo_root=repo_root,
                        max_rows=256) for m in ONNX_METHODS}


@pytest.mark.parametrize("method", ONNX_METHODS)
def test_publishes_parent_and_compressed(
        built: dict[str, tuple[ModelVersion, ModelVersion]], toy_onnx: Path, method: str) -> None:
    parent, child = built[method]
    assert parent.manifest.name == child.manifest.name == "toy-mlp"
    assert parent.manifest.variant == "fp32" and parent.manifest.compression.method == "none"
    assert parent.manifest.compression.details["source"] == str(toy_onnx.resolve())
    assert child.manifest.variant == VARIANT[method]
    assert child.manifest.compression.method == method
    assert child.manifest.compression.parent_version == parent.manifest.version
    assert child.manifest.runtime == parent.manifest.runtime == "onnx"
    for version in (parent, child):
        version.verify()
        assert version.manifest.inputs[0].name == "x"
        assert version.manifest.inputs[0].shape == [-1, 16]
        assert [o.shape for o in version.manifest.outputs] == [[-1, 4]]
        assert version.manifest.speed["rows_per_s"] > 0
        assert version.manifest.speed["batch"] == 128 and version.manifest.speed["threads"] == 1


def test_same_source_reuses_one_parent(built: dict[str, tuple[ModelVersion, ModelVersion]],
                                       toy_onnx: Path, calibration: Path,
                                       repo_root: Path) -> None:
    parents = {parent.key for parent, _ in built.values()}
    assert parents == {"toy-mlp@1"}
    again_parent, again = compress(toy_onnx, calibration=calibration, method="int8-dynamic",
                                   repo_root=repo_root, max_rows=64)
    assert again_parent.key == "toy-mlp@1"
    assert again.manifest.version > max(c.manifest.version for _, c in built.values())
    fp32 = [v for v in ModelRepository(repo_root).all("toy-mlp") if v.manifest.variant == "fp32"]
    assert len(fp32) == 1


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-static", "fp16"])
def test_quality_close_to_parent(built: dict[str, tuple[ModelVersion, ModelVersion]],
                                 method: str) -> None:
    quality = built[method][1].manifest.quality
    assert quality["mean_cosine_vs_parent"] >= 0.99
    assert quality["logits.mean_cosine_vs_parent"] == quality["mean_cosine_vs_parent"]
    assert 0 <= quality["logits.max_abs_diff"] < 0.5
    assert 0.9 <= quality["logits.top1_agreement"] <= 1.0
    assert quality["calibration_rows"] == 256
    assert quality["size_ratio"] < 1 if method == "fp16" else quality["size_ratio"] > 0
    speed = built[method][1].manifest.speed
    assert speed["speedup_vs_parent"] > 0 and speed["parent_rows_per_s"] > 0


def test_prune_records_sparsity(built: dict[str, tuple[ModelVersion, ModelVersion]]) -> None:
    child = built["prune:0.5"][1]
    details = child.manifest.compression.details
    assert details["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert details["pruned_tensors"] == 2 and details["fraction"] == 0.5
    assert child.manifest.quality["mean_cosine_vs_parent"] > 0.5


@pytest.mark.parametrize("method", ONNX_METHODS)
def test_compressed_artifact_runs(built: dict[str, tuple[ModelVersion, ModelVersion]],
                                  method: str) -> None:
    _, child = built[method]
    session = ort.InferenceSession(str(child.artifact), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": np.ones((5, 16), np.float32)})
    assert logits.shape == (5, 4) and logits.dtype == np.float32


def test_unknown_method(toy_onnx: Path, calibration: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="int8-dynamic, int8-static, fp16, prune:<fraction>"):
        compress(toy_onnx, calibration=calibration, method="int4", repo_root=tmp_path)


@pytest.mark.parametrize("method", ["prune:1.5", "prune:0", "prune:abc"])
def test_prune_fraction_out_of_range(toy_onnx: Path, calibration: Path, tmp_path: Path,
                                     method: str) -> None:
    with pytest.raises(CompressError, match="strictly between 0 and 1"):
        compress(toy_onnx, calibration=calibration, method=method, repo_root=tmp_path)


def test_text_file_is_not_a_model(calibration: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("this is not a model\n")
    with pytest.raises(CompressError, match="not a model") as caught:
        compress(fake, calibration=calibration, method="fp16", repo_root=tmp_path / "repo")
    assert str(fake) in str(caught.value)
    assert not (tmp_path / "repo").exists()


def test_other_extension_is_refused(calibration: Path, tmp_path: Path) -> None:
    other = tmp_path / "model.h5"
    other.write_bytes(b"\x89HDF")
    with pytest.raises(CompressError, match=r"expected an ONNX model \(.onnx\) or a TorchScript"):
        compress(other, calibration=calibration, method="fp16", repo_root=tmp_path)


def test_missing_model_file(calibration: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="does not exist"):
        compress(tmp_path / "nope.onnx", calibration=calibration, method="fp16",
                 repo_root=tmp_path)


def test_missing_calibration_file(toy_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="calibration file .* does not exist"):
        compress(toy_onnx, calibration=tmp_path / "none.npy", method="int8-static",
                 repo_root=tmp_path)


def test_calibration_of_wrong_row_shape(toy_onnx: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 8), np.float32))
    with pytest.raises(CompressError) as caught:
        compress(toy_onnx, calibration=wrong, method="int8-static", repo_root=tmp_path / "r")
    message = str(caught.value)
    assert "'x'" in message and "(16,)" in message and "(8,)" in message
    assert not (tmp_path / "r").exists()


def test_calibration_of_wrong_dtype_kind(toy_onnx: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.npy"
    np.save(text, np.array([["a"] * 16] * 4))
    with pytest.raises(CompressError, match="'x'"):
        compress(toy_onnx, calibration=text, method="fp16", repo_root=tmp_path)


def test_sanitized_names() -> None:
    assert sanitize_name("My Model.v2") == "my-model-v2"
    assert sanitize_name("x" * 80) == "x" * 64
    with pytest.raises(CompressError, match="model name"):
        sanitize_name("...")


# ---------------------------------------------------------------------------- TorchScript


@pytest.fixture(scope="module")
def toy_torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.script(_mlp()).save(str(path))
    return path


def test_torchscript_prune(toy_torchscript: Path, calibration: Path, tmp_path: Path) -> None:
    parent, child = compress(toy_torchscript, calibration=calibration, method="prune:0.5",
                             repo_root=tmp_path, name="Scripted MLP", threads=2)
    assert parent.manifest.name == "scripted-mlp"
    assert parent.manifest.runtime == child.manifest.runtime == "torchscript"
    assert (parent.manifest.variant, child.manifest.variant) == ("fp32", "pruned")
    assert child.manifest.compression.parent_version == parent.manifest.version
    assert child.manifest.compression.details["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert child.manifest.inputs[0].shape == [-1, 16] and child.manifest.inputs[0].name == "input"
    assert [(o.name, o.shape) for o in child.manifest.outputs] == [("output", [-1, 4])]
    assert child.manifest.quality["mean_cosine_vs_parent"] > 0.5
    assert child.manifest.speed["threads"] == 2
    for version in (parent, child):
        version.verify()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(child.artifact))
    weights = [p for p in module.parameters() if p.dim() >= 2]
    assert all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01) for w in weights)
    assert module(torch.ones(3, 16)).shape == (3, 4)


def test_torchscript_int8_is_refused(toy_torchscript: Path, calibration: Path,
                                     tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="TorchScript module supports only prune"):
        compress(toy_torchscript, calibration=calibration, method="int8-dynamic",
                 repo_root=tmp_path)


def test_state_dict_is_not_a_torchscript_model(calibration: Path, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_mlp().state_dict(), path)
    with pytest.raises(CompressError, match="not a model: expected a TorchScript module"):
        compress(path, calibration=calibration, method="prune:0.5", repo_root=tmp_path)


def test_table_calibration_is_read_by_the_readers_passed_in(toy_onnx: Path, tmp_path: Path
                                                            ) -> None:
    from producer.files.readers import read_chunks

    table = tmp_path / "rows.csv"
    rows = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    table.write_text("\n".join(",".join(f"{v:.5f}" for v in r) for r in rows) + "\n")
    with pytest.raises(CompressError, match=r"give a \.npy or \.npz"):
        compress(toy_onnx, calibration=table, method="fp16", repo_root=tmp_path / "a")
    _, child = compress(toy_onnx, calibration=table, method="fp16", repo_root=tmp_path / "b",
                        read_table=read_chunks)
    assert child.manifest.quality["calibration_rows"] == 64
