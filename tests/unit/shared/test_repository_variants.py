"""Variants, defaults (rollback), atomic publishing and artifact checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import ModelNotFound
from shared.repository import ModelCorrupt, ModelRef, ModelRepository, sha256_file
from shared.schemas import Compression, Manifest, TensorSpec


def manifest(variant: str = "fp32", **extra: object) -> Manifest:
    return Manifest(name="m", version=1, variant=variant,
                    inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=[-1])],
                    **extra)  # type: ignore[arg-type]


def publish(repo: ModelRepository, variant: str, payload: bytes = b"onnx") -> int:
    with repo.staging("m") as tmp:
        (tmp / "model.onnx").write_bytes(payload + variant.encode())
        parent = None if variant == "fp32" else 1
        return repo.publish(tmp, manifest(variant, compression=Compression(
            method="x", parent_version=parent))).manifest.version


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    for variant in ("fp32", "int8", "pruned", "int8"):  # versions 1..4
        publish(repo, variant)
    return repo


def test_publish_numbers_versions_and_records_sha256_and_size(repo: ModelRepository) -> None:
    assert repo.versions("m") == [1, 2, 3, 4]
    v = repo.load("m", 2)
    assert v.manifest.artifact_sha256 == sha256_file(v.artifact)
    assert v.manifest.size_bytes == v.artifact.stat().st_size
    assert v.manifest.created_at
    assert not [p for p in (repo.root / "m").iterdir() if p.name.startswith(".tmp-")]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    with pytest.raises(RuntimeError), repo.staging("m") as tmp:
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("build failed")
    assert repo.versions("m") == []
    assert list((tmp_path / "m").iterdir()) == []


def test_variant_references(repo: ModelRepository) -> None:
    assert repo.resolve("m:int8").manifest.version == 4  # the newest int8
    assert repo.resolve("m:pruned").manifest.version == 3
    assert repo.resolve("m:fp32").manifest.version == 1
    assert repo.resolve("m:int8@2").manifest.version == 2
    with pytest.raises(ModelNotFound, match="variant 'fp16'.*fp32, int8, pruned"):
        repo.resolve("m:fp16")
    with pytest.raises(ModelNotFound, match="is variant 'pruned', not 'int8'"):
        repo.resolve("m:int8@3")


def test_bare_name_means_fp32_until_a_default_is_set(repo: ModelRepository) -> None:
    assert repo.resolve("m").manifest.version == 1
    repo.set_default("m", variant="int8")
    assert repo.resolve("m").manifest.version == 4
    assert json.loads((repo.root / "m" / "default.json").read_text())["variant"] == "int8"
    repo.set_default("m", version=2)  # rollback to a specific version
    assert repo.resolve("m").manifest.version == 2
    assert repo.resolve(ModelRef("m", "fp32")).manifest.version == 1  # explicit wins


def test_a_default_must_exist(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFound):
        repo.set_default("m", variant="fp16")
    with pytest.raises(ModelNotFound):
        repo.set_default("m", version=9)
    with pytest.raises(ValueError):
        repo.set_default("m")


def test_without_fp32_or_default_the_newest_is_served(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    publish(repo, "int8")
    publish(repo, "pruned")
    assert repo.resolve("m").manifest.variant == "pruned"


def test_a_changed_artifact_is_refused(repo: ModelRepository) -> None:
    v = repo.load("m", 2)
    v.verify()
    v.artifact.write_bytes(b"tampered")
    with pytest.raises(ModelCorrupt, match="sha256.*corrupted"):
        v.verify()


def test_reuse_identical_publishes_an_artifact_only_once(repo: ModelRepository) -> None:
    with repo.staging("m") as tmp:
        (tmp / "model.onnx").write_bytes(b"onnxint8")  # version 4's bytes
        same = repo.publish(tmp, manifest("int8"), reuse_identical=True)
    assert same.manifest.version == 4 and repo.versions("m") == [1, 2, 3, 4]
    with repo.staging("m") as tmp:  # the same bytes as another variant: a new version
        (tmp / "model.onnx").write_bytes(b"onnxint8")
        assert repo.publish(tmp, manifest("pruned"), reuse_identical=True
                            ).manifest.version == 5
    assert publish(repo, "int8") == 6  # a plain publish still adds a version
    for version in (2, 4, 6):  # every copy corrupted: the rebuild publishes a sound one
        (repo.load("m", version).artifact).write_bytes(b"corrupted")
    with repo.staging("m") as tmp:
        (tmp / "model.onnx").write_bytes(b"onnxint8")
        assert repo.publish(tmp, manifest("int8"), reuse_identical=True
                            ).manifest.version == 7
