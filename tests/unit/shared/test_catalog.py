"""The model catalog in the result store (shared/catalog.py): what clients with no model
folder validate against. Here on fakeredis; end to end in
tests/integration/test_bucket_repository.py (a real worker publishes it, a real producer
with no models and no bucket access reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import fakeredis
import pytest

from shared import catalog
from shared.catalog import CatalogStore, open_for_clients
from shared.errors import ConfigError, ModelNotFound
from shared.repository import ModelRepository
from shared.repository.remote import RemoteRepository
from shared.settings import load_settings
from tests.unit.shared.test_repository import write_manifest

KEY = "t.inferq.catalog"


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    root = tmp_path / "models"
    write_manifest(root, "m", 1, reference_stats={"kind": "histogram", "edges": [0, 1]})
    write_manifest(root, "m", 2, variant="int8")
    write_manifest(root, "other", 1)
    return ModelRepository(root)


def _reader(redis: fakeredis.FakeRedis, tmp_path: Path) -> RemoteRepository:
    return RemoteRepository(CatalogStore(redis, KEY, "redis"), tmp_path / "cache", 0.0)


def test_clients_resolve_what_the_worker_published(repo, tmp_path):
    redis = fakeredis.FakeRedis()
    assert catalog.publish(redis, KEY, repo, ["m"]) == 2
    client = _reader(redis, tmp_path)
    assert client.names() == ["m"]  # only what was published
    assert client.resolve("m").key == "m@1" and client.resolve("m:int8").key == "m@2"
    stored = json.loads(redis.hget(KEY, "m/1/manifest.json"))
    assert "reference_stats" not in stored and stored["inputs"][0]["name"] == "x"
    repo.set_default("m", variant="int8")
    catalog.publish(redis, KEY, repo, ["m"])
    assert client.resolve("m").key == "m@2"


def test_removed_versions_and_defaults_leave_the_catalog(repo, tmp_path):
    redis = fakeredis.FakeRedis()
    repo.set_default("m", version=1)
    catalog.publish(redis, KEY, repo)
    assert redis.hexists(KEY, "m/default.json") and redis.hexists(KEY, "other/1/manifest.json")
    (repo.root / "m" / "default.json").unlink()
    (repo.root / "m" / "2" / "manifest.json").unlink()
    catalog.publish(redis, KEY, repo, ["m"], prune=False)  # a worker: adds, never removes
    assert redis.hexists(KEY, "m/2/manifest.json") and redis.hexists(KEY, "m/default.json")
    catalog.publish(redis, KEY, repo, ["m"])  # `inferq models`, after its change
    assert sorted(f.decode() for f in redis.hkeys(KEY)) == [
        "m/1/manifest.json", "other/1/manifest.json"]  # another worker's model stays


def test_an_unknown_model_names_the_catalog_and_what_to_do(repo, tmp_path):
    redis = fakeredis.FakeRedis()
    catalog.publish(redis, KEY, repo, ["m"])
    with pytest.raises(ModelNotFound, match=r"unknown model 'nope' in the model catalog "
                       r"t.inferq.catalog in redis \(it holds: m\); start a worker serving"):
        _reader(redis, tmp_path).resolve("nope")


def test_the_catalog_is_read_only_for_clients(repo, tmp_path):
    client = _reader(fakeredis.FakeRedis(), tmp_path)
    with pytest.raises(PermissionError):
        client.store.write("m/default.json", b"{}")


def test_which_source_a_client_reads(tmp_path):
    redis_url = "redis://127.0.0.1:6379/12"
    folder = tmp_path / "models"

    def source(**overrides: object) -> str:
        settings = load_settings(broker_url=redis_url, home=tmp_path / "home", **overrides)
        repo = open_for_clients(settings)
        return "store" if isinstance(getattr(repo, "store", None), CatalogStore) else "repo"

    assert source(model_repo=folder) == "store"  # no such folder: the catalog
    folder.mkdir()
    assert source(model_repo=folder) == "repo"
    assert source(model_repo=folder, model_source="store") == "store"
    assert source(model_repo=tmp_path / "none", model_source="repo") == "repo"
    assert source(model_repo="s3://bucket/models") == "repo"  # a bucket is configured
    embedded = load_settings(model_repo=tmp_path / "none", home=tmp_path / "home")
    assert type(open_for_clients(embedded)) is ModelRepository  # no Redis: the folder
    with pytest.raises(ConfigError, match="INFERQ_MODEL_SOURCE=store needs a redis://"):
        open_for_clients(load_settings(model_repo=folder, model_source="store",
                                       home=tmp_path / "home"))
