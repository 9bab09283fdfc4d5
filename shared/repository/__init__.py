"""The model repository: ``<root>/<name>/<version>/{manifest.json, artifact, ...}``.

``local.py``: a folder (``ModelRepository``, references, versions); ``remote.py``: the same
repository in object storage, read through a local cache (``RemoteRepository``).
``open_repository`` picks one from ``INFERQ_MODEL_REPO``.
"""

from __future__ import annotations

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

__all__ = ["DEFAULT", "MANIFEST", "MAX_VERSION_DIGITS", "ModelCorrupt", "ModelRef",
           "ModelRepository", "ModelVersion", "RemoteRepository", "as_repository",
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
