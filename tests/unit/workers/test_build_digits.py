"""The digits build: a valid manifest, an honest ONNX graph, versioning and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from shared.repository import ModelRepository, ModelVersion
from shared.schemas import Manifest
from workers.build.digits import build_digits, ensure_digits, load_digits_data


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelVersion, ModelVersion]:
    """Two builds with the same seed into one repository: versions 1 and 2."""
    root = tmp_path_factory.mktemp("models")
    return build_digits(root, seed=0), build_digits(root, seed=0)


@pytest.fixture(scope="module")
def first(builds: tuple[ModelVersion, ModelVersion]) -> ModelVersion:
    return builds[0]


@pytest.fixture(scope="module")
def outputs(first: ModelVersion) -> dict[str, np.ndarray]:
    images, _ = load_digits_data()
    session = ort.InferenceSession(str(first.artifact), providers=["CPUExecutionProvider"])
    names = [o.name for o in first.manifest.outputs]
    return dict(zip(names, session.run(names, {"image": images[:37]}), strict=True))


def test_load_digits_data() -> None:
    images, labels = load_digits_data()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 16


def test_manifest_validates(first: ModelVersion) -> None:
    raw = json.loads((first.path / "manifest.json").read_text())
    manifest = Manifest.model_validate(raw)
    assert manifest.name == "digits" and manifest.version == 1
    assert manifest.size_bytes == first.artifact.stat().st_size > 0
    assert manifest.quality["heldout_rows"] == 360
    assert manifest.quality["train_rows"] == 1437
    assert first.path.name == "1" and first.artifact.is_file()


def test_heldout_accuracy(first: ModelVersion) -> None:
    assert first.manifest.quality["heldout_accuracy"] >= 0.97
    assert first.manifest.quality["full_accuracy"] >= 0.97


def test_outputs_match_declared_specs(first: ModelVersion, outputs: dict[str, np.ndarray]) -> None:
    for spec in first.manifest.outputs:
        got = outputs[spec.name]
        assert got.dtype == spec.np_dtype, spec.name
        assert got.shape == (37, *spec.row_shape), spec.name


def test_probabilities_and_labels_agree(outputs: dict[str, np.ndarray]) -> None:
    probabilities, labels = outputs["probabilities"], outputs["label"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))


def test_second_build_is_version_two(builds: tuple[ModelVersion, ModelVersion]) -> None:
    first, second = builds
    assert second.manifest.version == 2 and second.path.name == "2"
    repo = ModelRepository(first.path.parent.parent)
    assert repo.versions("digits") == [1, 2]
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_same_seed_is_deterministic(builds: tuple[ModelVersion, ModelVersion]) -> None:
    first, second = builds
    assert first.manifest.quality == second.manifest.quality


def test_ensure_digits_reuses_latest(builds: tuple[ModelVersion, ModelVersion]) -> None:
    root = builds[0].path.parent.parent
    assert ensure_digits(root).manifest.version == 2


def test_ensure_digits_builds_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: ModelVersion
) -> None:
    # Stands in for the build so the suite trains at most twice.
    calls: list[Path] = []

    def fake_build(repo: ModelRepository, **_: object) -> ModelVersion:
        calls.append(repo.root)
        return first

    monkeypatch.setattr("workers.build.digits.build_digits", fake_build)
    assert ensure_digits(tmp_path) is first
    assert calls == [tmp_path]
