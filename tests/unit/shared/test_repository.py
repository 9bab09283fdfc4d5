"""The model repository: versions on disk, references, and name checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import InvalidModelName, ModelNotFound
from shared.repository import ModelRef, ModelRepository, parse_model_ref
from shared.schemas import Manifest, TensorSpec, check_model_name


def write_manifest(root: Path, name: str, version: int, **extra: object) -> Path:
    folder = root / name / str(version)
    folder.mkdir(parents=True)
    manifest = Manifest(
        name=name, version=version,
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1])],
        **extra,  # type: ignore[arg-type]
    )
    (folder / "manifest.json").write_text(manifest.model_dump_json())
    return folder


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    root = tmp_path / "models"
    write_manifest(root, "m", 1, notes="first")
    write_manifest(root, "m", 2, notes="second")
    write_manifest(root, "other", 1)
    (root / "m" / "3").mkdir()  # no manifest yet: a build in progress
    (root / "m" / "latest").mkdir()  # not a version number
    return ModelRepository(root)


def test_versions_and_names(repo: ModelRepository) -> None:
    assert repo.versions("m") == [1, 2]
    assert repo.versions("nothing") == []
    assert repo.names() == ["m", "other"]


def test_versions_sort_numerically(tmp_path: Path) -> None:
    for v in (2, 10, 9):
        write_manifest(tmp_path, "m", v)
    repo = ModelRepository(tmp_path)
    assert repo.versions("m") == [2, 9, 10]
    assert repo.resolve("m").manifest.version == 10


def test_resolve_latest(repo: ModelRepository) -> None:
    mv = repo.resolve("m")
    assert mv.manifest.version == 2 and mv.manifest.notes == "second"
    assert mv.path == repo.root / "m" / "2"
    assert mv.key == "m@2"
    assert mv.artifact == repo.root / "m" / "2" / "model.onnx"


def test_resolve_pinned(repo: ModelRepository) -> None:
    assert repo.resolve("m@1").manifest.notes == "first"
    assert repo.resolve("m", version=1).key == "m@1"
    assert repo.resolve("m@2", version=1).key == "m@1"  # the explicit argument wins


def test_unknown_model_lists_the_known_ones(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFound, match="unknown model 'nope'") as info:
        repo.resolve("nope")
    assert "m, other" in str(info.value)


def test_unknown_model_in_an_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="it holds: none"):
        ModelRepository(tmp_path).resolve("m")


def test_a_missing_relative_repository_is_named_with_its_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run outside the clone, the default `models` is a folder that is not there: the
    message names where it looked and the setting to change."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound) as info:
        ModelRepository("models").resolve("digits")
    text = str(info.value)
    assert f"{tmp_path.resolve() / 'models'} (INFERQ_MODEL_REPO) does not exist" in text
    assert "set INFERQ_MODEL_REPO" in text


@pytest.mark.parametrize("stray", ["__pycache__", ".tmp-build", "Scratch"])
def test_stray_folders_do_not_break_the_listing(repo: ModelRepository, stray: str) -> None:
    (repo.root / stray).mkdir()
    assert repo.names() == ["m", "other"]
    with pytest.raises(ModelNotFound):
        repo.resolve("nope")


@pytest.mark.parametrize("ref", ["m@3", "m@7", "other@2"])
def test_missing_version(repo: ModelRepository, ref: str) -> None:
    with pytest.raises(ModelNotFound, match="has no version") as info:
        repo.resolve(ref)
    assert "versions: [" in str(info.value)


@pytest.mark.parametrize("ref", ["m@0", "m@x", "m@-1", "m@1.5"])
def test_invalid_version(repo: ModelRepository, ref: str) -> None:
    with pytest.raises(InvalidModelName, match="positive integer"):
        repo.resolve(ref)


@pytest.mark.parametrize("name", ["../etc", "..", "A", "x/y", "", "-x", "a b", "a" * 65,
                                  "/abs", "m\\x", "m\nx", "\nm"])
def test_unsafe_names_are_refused(repo: ModelRepository, name: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        check_model_name(name)
    with pytest.raises(ValueError, match="invalid"):
        repo.resolve(name)
    with pytest.raises(ValueError, match="invalid"):
        repo.versions(name)


def test_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid"):
        check_model_name("m\n")


def test_traversal_through_a_reference_is_refused(repo: ModelRepository) -> None:
    with pytest.raises(ValueError):
        repo.resolve("../etc@1")


@pytest.mark.parametrize("name", ["a", "m", "digits", "a" * 64, "0x", "res_net-50"])
def test_good_names(name: str) -> None:
    assert check_model_name(name) == name


def test_parse_model_ref() -> None:
    assert parse_model_ref("digits") == ModelRef("digits")
    assert parse_model_ref("digits@3") == ModelRef("digits", None, 3)
    assert parse_model_ref("digits@") == ModelRef("digits")
    assert parse_model_ref("minilm:int8") == ModelRef("minilm", "int8")
    assert parse_model_ref("minilm:int8@4") == ModelRef("minilm", "int8", 4)
    assert str(ModelRef("minilm", "int8", 4)) == "minilm:int8@4"
    with pytest.raises(InvalidModelName, match="variant"):
        parse_model_ref("minilm:../x")


def test_manifest_refuses_a_bad_name() -> None:
    with pytest.raises(ValueError, match="invalid"):
        Manifest(name="../x", version=1, inputs=[], outputs=[])


def test_next_version(repo: ModelRepository, tmp_path: Path) -> None:
    assert repo.next_version("m") == 3  # the manifest-less folder 3 does not count
    assert repo.next_version("other") == 2
    assert repo.next_version("new") == 1
    assert ModelRepository(tmp_path / "absent").next_version("m") == 1


def test_a_cached_resolver_sees_a_new_version_only_after_its_ttl(
        repo: ModelRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.repository as repository

    now = [100.0]
    monkeypatch.setattr(repository.time, "monotonic", lambda: now[0])
    resolver = repository.CachedResolver(repo, ttl=5.0)
    assert not resolver.fresh(parse_model_ref("m"))  # never read: resolving reads
    assert resolver.resolve(parse_model_ref("m")).key == "m@2"
    write_manifest(repo.root, "m", 4, notes="fourth")
    now[0] += 4.9
    assert resolver.fresh(parse_model_ref("m"))
    assert resolver.resolve(parse_model_ref("m")).key == "m@2"  # reused
    assert resolver.resolve(parse_model_ref("m@4")).key == "m@4"  # another reference
    now[0] += 0.1
    assert not resolver.fresh(parse_model_ref("m"))  # the API resolves it off its loop
    assert resolver.resolve(parse_model_ref("m")).key == "m@4"  # re-read at the ttl
