"""`inferq models build`'s default policy (workers/build/bundled.py), with the builders
replaced by ones that publish small artifacts: the measured default is set only where
none was set before, and every change of what the bare name serves is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.repository import ModelRepository, ModelVersion
from shared.schemas import Manifest, TensorSpec
from workers.build import bundled


def _publish(repo: ModelRepository, variant: str, payload: bytes) -> ModelVersion:
    with repo.staging("digits") as tmp:
        (tmp / "model.onnx").write_bytes(payload)
        return repo.publish(tmp, Manifest(
            name="digits", version=1, variant=variant,
            inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
            outputs=[TensorSpec(name="y", dtype="float32", shape=[-1])]),
            reuse_identical=True)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRepository:
    """A repository as `make demo` leaves it (digits@1, fp32) and a fake digits build
    that measures int8 best; ``repo.payload`` sets what the next build produces."""
    repo = ModelRepository(tmp_path / "models")
    _publish(repo, "fp32", b"fp32-a")
    payload = {"fp32": b"fp32-a", "int8": b"int8-a"}

    def build(r: ModelRepository) -> tuple[list[ModelVersion], str]:
        return [_publish(r, v, p) for v, p in payload.items()], "int8"

    monkeypatch.setitem(bundled._BUILDERS, "digits", build)
    repo.payload = payload  # type: ignore[attr-defined]
    return repo


def test_the_first_build_after_the_demo_says_what_the_name_serves_now(repo) -> None:
    built = bundled.build_bundled(repo.root, ["digits"])
    assert [v.key for v in built.new] == ["digits@2"]  # fp32 reused, int8 new
    assert repo.resolve("digits").key == "digits@2"
    assert built.notes == ["digits now serves digits@2 (int8), was digits@1 (fp32): the "
                           "variant this build measured best; `inferq models default "
                           "digits <variant or @version>` changes it"]
    again = bundled.build_bundled(repo.root, ["digits"])
    assert again.new == [] and again.notes == []


def test_a_default_set_before_the_build_is_kept(repo) -> None:
    repo.set_default("digits", version=1)  # a rollback someone made
    built = bundled.build_bundled(repo.root, ["digits"])
    assert repo.resolve("digits").key == "digits@1"
    assert built.notes == ["digits: kept the default set before (version 1); this build "
                           "measured int8 best: `inferq models default digits int8` "
                           "serves it"]


def test_a_variant_default_follows_its_newest_version_and_says_so(repo) -> None:
    bundled.build_bundled(repo.root, ["digits"])  # default: int8, serving digits@2
    repo.payload["int8"] = b"int8-b"  # a changed recipe: a new int8 artifact
    built = bundled.build_bundled(repo.root, ["digits"])
    assert repo.resolve("digits").key == "digits@3"
    assert built.notes == ["digits now serves digits@3 (int8), was digits@2 (int8): the "
                           "newest version of the default set before (variant int8)"]
