"""The model repository: ``<root>/<name>/<version>/{manifest.json, artifact, ...}``.

``local.py``: a folder (``ModelRepository``, references, versions); ``remote.py``: the same
repository in object storage, read through a local cache (``RemoteRepository``).
``open_repository`` picks one from ``INFERQ_MODEL_REPO``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from shared.objectstore import is_remote
from shared.repository.local import (
    DEFAULT,
    MANIFEST,
    MAX_VERSION_DIGITS,
    ModelCorrupt,
    ModelRef,
    ModelRepository,
    ModelVersion,
    parse_model_ref,
    sha256_file,
)
from shared.repository.remote import RemoteRepository

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["DEFAULT", "MANIFEST", "MAX_VERSION_DIGITS", "CachedResolver", "ModelCorrupt",
           "ModelRef", "ModelRepository", "ModelVersion", "RemoteRepository", "as_repository",
           "open_repository", "parse_model_ref", "sha256_file"]


def as_repository(where: ModelRepository | Path | str) -> ModelRepository:
    """A repository object from one, or from a folder (the builders take either)."""
    return where if isinstance(where, ModelRepository) else ModelRepository(where)


def open_repository(settings: Settings) -> ModelRepository:
    """The repository ``INFERQ_MODEL_REPO`` names: a folder, or a bucket URL read through
    the cache in ``INFERQ_MODEL_CACHE`` (shared/repository/remote.py)."""
    if not is_remote(settings.model_repo):
        return ModelRepository(settings.model_repo.removeprefix("file://"))
    return RemoteRepository.open(settings.model_repo, settings.effective_model_cache(),
                                 settings.model_refresh_s)


class CachedResolver:
    """Model references resolved against a repository, each answer reused for ``ttl``
    seconds: a new version or default is seen within that time, without re-reading the
    repository for every job (producers and workers both resolve this way)."""

    def __init__(self, repo: ModelRepository, ttl: float = 5.0):
        self.repo, self.ttl = repo, ttl
        self._cache: dict[str, tuple[float, ModelVersion]] = {}

    def fresh(self, ref: ModelRef) -> bool:
        """``resolve`` would answer from memory, without reading the repository."""
        cached = self._cache.get(str(ref))
        return cached is not None and time.monotonic() - cached[0] < self.ttl

    def resolve(self, ref: ModelRef) -> ModelVersion:
        key = str(ref)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is None or now - cached[0] >= self.ttl:
            cached = (now, self.repo.resolve(ref))
            self._cache[key] = cached
        return cached[1]
