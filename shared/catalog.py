"""The model catalog: every served model's manifests and default, kept in the result store,
so producers, the SDK and the API validate inputs with no model folder and no bucket
access: a client host needs only the broker and the result store.

Workers publish it when they start and every ``INFERQ_MODEL_REFRESH_S`` seconds after;
``inferq models build|compress|default`` publish it at once. It is one Redis hash,
``<INFERQ_QUEUE_PREFIX>inferq.catalog``, whose fields are the repository's own file names
(``digits/3/manifest.json``, ``digits/default.json``; manifests without their drift
reference, which only workers use). Readers see it through :class:`CatalogStore`, an
object store over that hash, so a client's view of it is shared/repository/remote.py's
mirror, with the same resolving, defaults and error messages as every other repository.
Which one a client reads: ``INFERQ_MODEL_SOURCE`` (auto: a bucket or an existing folder
when configured, else the catalog when the result store is Redis).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from shared import keys
from shared.errors import ConfigError
from shared.objectstore import is_remote
from shared.repository import DEFAULT, MANIFEST, ModelRepository, open_repository
from shared.repository.remote import RemoteRepository
from shared.settings import Settings, scrub

logger = logging.getLogger(__name__)


def entries(repo: ModelRepository, names: list[str]) -> dict[str, bytes]:
    """The catalog's fields for ``names``: each version's manifest and the default."""
    found: dict[str, bytes] = {}
    for name in names:
        for version in repo.all(name):
            m = version.manifest.model_dump(mode="json", exclude={"reference_stats"})
            found[f"{name}/{version.manifest.version}/{MANIFEST}"] = json.dumps(m).encode()
        default = repo.default(name)
        if default:
            found[f"{name}/{DEFAULT}"] = json.dumps(default).encode()
    return found


def publish(redis: Any, key: str, repo: ModelRepository, names: list[str] | None = None,
            *, prune: bool = True) -> int:
    """Write the catalog entries of ``names`` (default: every model); ``prune``: also
    remove those of versions or defaults no longer in ``repo``. -> entries written.

    Workers do not prune: one whose view of a bucket is a few seconds old would remove
    what another worker or ``inferq models`` just published. ``inferq models`` prunes,
    right after its own change."""
    names = repo.names() if names is None else names
    fresh = entries(repo, names)
    stale = [f.decode() for f in redis.hkeys(key)
             if f.decode().split("/", 1)[0] in names and f.decode() not in fresh] if prune else []
    pipe = redis.pipeline()
    if stale:
        pipe.hdel(key, *stale)
    if fresh:
        pipe.hset(key, mapping=fresh)
    pipe.execute()
    return len(fresh)


class CatalogStore:
    """The catalog hash as a read-only object store (shared/objectstore.py)."""

    def __init__(self, redis: Any, key: str, where: str, folder: Path | None = None):
        self._redis = redis
        self.key = key
        self.url = f"the model catalog {key} in {where}"  # also names its cache folder
        self.hint = "start a worker serving it (workers publish the catalog), or " + (
            "point INFERQ_MODEL_REPO at the repository" if folder is None else
            f"set INFERQ_MODEL_REPO to the repository's folder: {folder} "
            "(INFERQ_MODEL_REPO) does not exist")

    def listing(self, prefix: str = "") -> dict[str, str]:
        found = {}
        for field, value in self._redis.hgetall(self.key).items():
            name = field.decode()
            if name.startswith(prefix):
                found[name] = hashlib.sha1(value).hexdigest()
        return found

    def read(self, key: str) -> bytes:
        value = self._redis.hget(self.key, key)
        if value is None:
            raise FileNotFoundError(key)
        return bytes(value)

    def download(self, key: str, dest: Path) -> None:
        raise PermissionError("the catalog holds manifests only: artifacts are the workers'")

    def write(self, key: str, data: bytes) -> None:
        raise PermissionError(READ_ONLY)

    def upload(self, src: Path, key: str) -> None:
        raise PermissionError(READ_ONLY)

    def create(self, key: str, data: bytes) -> bool:
        raise PermissionError(READ_ONLY)


READ_ONLY = ("the catalog is read-only here: workers and `inferq models` write it from the "
             "model repository")


def open_for_clients(settings: Settings) -> ModelRepository:
    """What producers, the SDK and the API validate against (``INFERQ_MODEL_SOURCE``):
    the repository, or the catalog in the result store. ``auto``: the repository when it
    is a bucket or a folder that exists, else the catalog when the result store is Redis."""
    source, folder = settings.model_source, None
    if source == "auto":
        local = not is_remote(settings.model_repo)
        path = Path(settings.model_repo.removeprefix("file://")).resolve()
        missing = local and not path.is_dir()
        source = "store" if missing and _redis_store(settings) else "repo"
        folder = path if missing else None
    if source == "repo":
        return open_repository(settings)
    url = _redis_store(settings)
    if not url:
        raise ConfigError("INFERQ_MODEL_SOURCE=store needs a redis:// result store "
                          "(INFERQ_RESULT_BACKEND)")
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    store = CatalogStore(client, keys.catalog(settings.queue_prefix), scrub(url), folder)
    return RemoteRepository(store, settings.effective_model_cache(), settings.model_refresh_s)


def _redis_store(settings: Settings) -> str:
    if settings.embedded:
        return ""
    try:
        url = settings.effective_result_backend()
    except ConfigError:
        return ""
    return url if url.startswith(("redis://", "rediss://", "unix://")) else ""


class Publisher:
    """A worker's daemon thread that keeps its models' catalog entries fresh."""

    def __init__(self, settings: Settings, repo: ModelRepository, names: list[str], *,
                 prune: bool = False):
        import redis

        self.url = _redis_store(settings)
        self.key = keys.catalog(settings.queue_prefix)
        self.repo, self.names, self.prune = repo, names, prune
        self.interval = settings.model_refresh_s
        self._redis = redis.Redis.from_url(self.url, socket_connect_timeout=2.0,
                                           socket_timeout=5.0) if self.url else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-catalog", daemon=True)

    def start(self) -> Publisher:
        if self._redis is not None:
            self.publish_once()  # before the worker takes jobs: clients can validate
            self._thread.start()
        return self

    def publish_once(self) -> None:
        try:
            publish(self._redis, self.key, self.repo, self.names, prune=self.prune)
        except Exception as exc:  # the store or the bucket is away: the next round
            logger.warning("publishing the model catalog failed: %s: %s",
                           type(exc).__name__, str(exc)[:200])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish_once()

    def stop(self) -> None:
        self._stop.set()
