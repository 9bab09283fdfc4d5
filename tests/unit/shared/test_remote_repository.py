"""A model repository in object storage (shared/repository/remote.py), here on fsspec's
in-process memory filesystem; against a real S3 protocol server:
tests/integration/test_bucket_repository.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from shared.errors import InferqError, ModelNotFound, UnsafeModelPath
from shared.objectstore import FsspecStore, is_remote
from shared.repository import ModelCorrupt, open_repository
from shared.repository.remote import RemoteRepository
from shared.schemas import Manifest, TensorSpec
from shared.settings import load_settings

pytest.importorskip("fsspec")


def _manifest(variant: str = "fp32") -> Manifest:
    return Manifest(name="m", version=1, variant=variant,
                    inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=[-1])])


def _publish(repo: RemoteRepository, artifact: bytes, variant: str = "fp32",
             **kwargs: bool) -> int:
    with repo.staging("m") as staged:
        (staged / "model.onnx").write_bytes(artifact)
        (staged / "extra").mkdir()
        (staged / "extra" / "vocab.txt").write_text("a b c")
        return repo.publish(staged, _manifest(variant), **kwargs).manifest.version


@pytest.fixture
def url() -> str:
    return f"memory://inferq-tests-{uuid.uuid4().hex[:8]}/models"


def _reader(url: str, tmp_path: Path) -> RemoteRepository:
    """Another host: its own cache, listing on every call."""
    return RemoteRepository.open(url, tmp_path / f"cache-{uuid.uuid4().hex[:6]}", 0.0)


def test_published_versions_are_seen_by_another_host_and_downloaded_once(url, tmp_path):
    builder = _reader(url, tmp_path)
    assert _publish(builder, b"one") == 1
    assert _publish(builder, b"two", variant="int8") == 2
    store = FsspecStore(url)
    assert set(store.listing("m/1/")) == {"m/1/.claim", "m/1/model.onnx",
                                          "m/1/extra/vocab.txt", "m/1/manifest.json"}

    host = _reader(url, tmp_path)
    assert host.names() == ["m"] and host.versions("m") == [1, 2]
    served = host.resolve("m:int8")
    assert served.key == "m@2" and not served.artifact.exists()  # manifests only, so far
    host.materialize(served)
    assert served.artifact.read_bytes() == b"two"
    assert (served.path / "extra" / "vocab.txt").read_text() == "a b c"
    served.verify()
    store.write("m/2/model.onnx", b"changed")  # would be refused if downloaded again
    host.materialize(served)  # already cached: nothing fetched
    assert served.artifact.read_bytes() == b"two"


def test_a_corrupted_object_is_refused_and_nothing_reaches_the_cache(url, tmp_path):
    _publish(_reader(url, tmp_path), b"good")
    FsspecStore(url).write("m/1/model.onnx", b"bad!")
    host = _reader(url, tmp_path)
    version = host.resolve("m")
    with pytest.raises(ModelCorrupt, match=r"m/1/model.onnx has sha256 .*refused"):
        host.materialize(version)
    assert not version.artifact.exists()
    assert not (version.path / "extra").exists()


def test_a_missing_artifact_is_named(url, tmp_path):
    _publish(_reader(url, tmp_path), b"good")
    fs = FsspecStore(url)
    fs._fs.rm(fs._path("m/1/model.onnx"))
    host = _reader(url, tmp_path)
    with pytest.raises(ModelNotFound, match="m/1/model.onnx is missing from the bucket"):
        host.materialize(host.resolve("m"))


def test_the_default_moves_for_every_host_and_a_removed_one_is_forgotten(url, tmp_path):
    builder, host = _reader(url, tmp_path), _reader(url, tmp_path)
    _publish(builder, b"one")
    _publish(builder, b"two", variant="int8")
    assert host.resolve("m").key == "m@1"  # no default: the newest fp32
    builder.set_default("m", variant="int8")
    assert json.loads(FsspecStore(url).read("m/default.json"))["variant"] == "int8"
    assert host.resolve("m").key == "m@2"
    builder.set_default("m", version=1)  # a rollback
    assert host.resolve("m").key == "m@1"
    fs = FsspecStore(url)
    fs._fs.rm(fs._path("m/default.json"))
    assert host.resolve("m").key == "m@1" and host.default("m") == {}


def test_a_claimed_number_is_skipped_and_an_identical_artifact_reused(url, tmp_path):
    repo = _reader(url, tmp_path)
    FsspecStore(url).create("m/1/.claim", b"another publisher, never finished")
    assert _publish(repo, b"one") == 2
    assert _publish(repo, b"one", reuse_identical=True) == 2
    assert _publish(repo, b"one") == 3  # without reuse: a new version


def test_a_bucket_that_is_away_leaves_the_cached_manifests_served(url, tmp_path,
                                                                   monkeypatch):
    _publish(_reader(url, tmp_path), b"one")
    host = _reader(url, tmp_path)
    assert host.resolve("m").key == "m@1"

    def away(prefix: str = "") -> dict[str, str]:
        raise ConnectionError("bucket unreachable")

    monkeypatch.setattr(host.store, "listing", away)
    assert host.resolve("m").key == "m@1"
    with pytest.raises(InferqError, match="cannot be listed: ConnectionError"):
        host.refresh(force=True)


def test_keys_from_the_bucket_cannot_write_or_read_outside_the_cache(url, tmp_path):
    store = FsspecStore(url)
    _publish(_reader(url, tmp_path), b"one")
    manifest = _manifest().model_copy(update={"version": 2, "artifact": "../../../secret"})
    store.write("m/2/manifest.json", manifest.model_dump_json().encode())
    store.write("..evil/1/manifest.json", b"{}")
    store.write("m/1/../../../escaped", b"x")
    host = _reader(url, tmp_path)
    assert host.names() == ["m"]
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeModelPath):
        host.resolve("m@2")
    host.materialize(host.resolve("m@1"))
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))


def test_an_unknown_model_names_the_bucket(url, tmp_path):
    _publish(_reader(url, tmp_path), b"one")
    with pytest.raises(ModelNotFound, match=r"unknown model 'nope' in memory://.*holds: m"):
        _reader(url, tmp_path).resolve("nope")


def test_settings_pick_the_repository(tmp_path, url):
    assert is_remote(url) and is_remote("s3://b/p") and not is_remote("models")
    local = open_repository(load_settings(model_repo=tmp_path / "models"))
    assert type(local).__name__ == "ModelRepository" and local.root == tmp_path / "models"
    remote = open_repository(load_settings(model_repo=url, home=tmp_path / "home",
                                           model_refresh_s=1))
    assert isinstance(remote, RemoteRepository) and remote.location == url + "/"
    assert remote.root.is_relative_to(tmp_path / "home" / "model-cache")


def test_a_version_replaced_in_the_bucket_is_downloaded_again(url, tmp_path):
    """A version number reused after the version was removed, or files replaced under a
    new manifest: the cache follows the manifest, not the file names."""
    builder, host = _reader(url, tmp_path), _reader(url, tmp_path)
    _publish(builder, b"one")
    first = host.materialize(host.resolve("m"))
    assert first.artifact.read_bytes() == b"one"
    fs = FsspecStore(url)
    fs._fs.rm(fs._path("m/1"), recursive=True)  # retracted, claim and all
    assert host.versions("m") == [] and not first.path.exists()  # the cache forgets it
    assert _publish(builder, b"two") == 1  # the number again, other bytes
    again = host.materialize(host.resolve("m"))
    assert again.artifact.read_bytes() == b"two"
    again.verify()


def test_processes_sharing_a_cache_restore_what_another_removed(url, tmp_path):
    cache = tmp_path / "shared-cache"
    one = RemoteRepository.open(url, cache, 0.0)
    two = RemoteRepository.open(url, cache, 0.0)
    _publish(_reader(url, tmp_path), b"one")
    assert one.versions("m") == [1] and two.versions("m") == [1]
    (one.root / "m" / "1" / "manifest.json").unlink()  # as an older listing elsewhere would
    assert two.versions("m") == [1]  # mirrored again, though its token did not change


def test_a_cached_version_is_served_while_the_bucket_is_away(url, tmp_path, monkeypatch):
    _publish(_reader(url, tmp_path), b"one")
    _publish(_reader(url, tmp_path), b"two", variant="int8")
    host = _reader(url, tmp_path)
    cached = host.materialize(host.resolve("m"))
    uncached = host.resolve("m:int8")

    def away(prefix: str = "") -> dict[str, str]:
        raise ConnectionError("bucket unreachable")

    monkeypatch.setattr(host.store, "listing", away)
    assert host.materialize(cached).artifact.read_bytes() == b"one"
    with pytest.raises(InferqError, match=r"m/2/ cannot be listed .*not cached yet"):
        host.materialize(uncached)
