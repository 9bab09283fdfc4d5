"""A model repository in object storage (``INFERQ_MODEL_REPO=s3://bucket/prefix``), read
through a local cache.

The bucket holds the same layout as a folder (``<name>/<version>/{manifest.json, artifact}``,
``<name>/default.json``). The cache (``INFERQ_MODEL_CACHE/<hash of the URL>``) mirrors every
manifest and default, re-listed at most every ``INFERQ_MODEL_REFRESH_S`` seconds, so
resolving, hot reload and rollback work exactly as on a folder; an artifact is downloaded
once per version, when a worker first serves it, checked against its manifest's sha256 and
only then moved into the cache (a corrupted object is refused, nothing half-written is
ever loaded). Producers and the API read manifests only, never artifacts.

Publishing writes a version, then its pointer: a ``.claim`` object created only if absent
(S3's conditional write) reserves the number, the files go up, the manifest last; readers
list versions by their manifests, so they never see half a model. ``default.json`` is one
PUT. A bucket that is away leaves workers serving what their cache holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

from shared.errors import InferqError, ModelNotFound
from shared.objectstore import ObjectStore, open_store
from shared.repository.local import (
    DEFAULT,
    MANIFEST,
    MAX_VERSION_DIGITS,
    ModelCorrupt,
    ModelRef,
    ModelRepository,
    ModelVersion,
    sha256_file,
    utc_now,
    write_atomic,
)
from shared.schemas import MODEL_NAME, Manifest

logger = logging.getLogger(__name__)

CLAIM = ".claim"
FETCHED = ".fetched"  # in a cached version folder: the hash of the manifest its files match


def cache_folder(cache_root: Path, url: str) -> Path:
    """One cache folder per repository URL: two buckets never mix."""
    return cache_root / hashlib.sha256(url.encode()).hexdigest()[:16]


class RemoteRepository(ModelRepository):
    def __init__(self, store: ObjectStore, cache_root: Path, refresh_s: float = 5.0):
        super().__init__(cache_folder(cache_root, store.url))
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.refresh_s = refresh_s
        self._listing: dict[str, str] = {}  # key -> token, as last listed
        self._mirrored: dict[str, str] = {}  # manifest/default key -> token mirrored
        self._listed_at = -float("inf")
        self._refreshing = threading.Lock()  # one listing at a time
        self._locks: dict[str, threading.Lock] = {}  # a download lock per version folder
        self._locks_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, cache_root: Path, refresh_s: float = 5.0) -> RemoteRepository:
        return cls(open_store(url), cache_root, refresh_s)

    @property
    def location(self) -> str:
        return self.store.url

    # -- mirroring manifests and defaults ------------------------------------------------
    def refresh(self, *, force: bool = False) -> None:
        """List the bucket and mirror every changed manifest and default (throttled).

        One thread lists at a time; the others go on with the cache meanwhile (a slow or
        unreachable bucket never holds up resolving). ``force`` waits for its own listing
        and raises when the bucket cannot be listed."""
        if not force and time.monotonic() - self._listed_at < self.refresh_s:
            return
        if not self._refreshing.acquire(blocking=force):
            return  # another thread is listing
        try:
            self._refresh(force)
        finally:
            self._refreshing.release()

    def _refresh(self, force: bool) -> None:
        try:
            listing = self.store.listing()
        except Exception as exc:  # the bucket is away: serve what the cache holds
            self._listed_at = time.monotonic()  # and try again later, not per call
            logger.warning("model repository %s: listing failed (%s); serving the cached "
                           "manifests", self.store.url, _short(exc))
            if force:
                raise InferqError(f"model repository {self.store.url} cannot be listed: "
                                  f"{_short(exc)}") from None
            return
        for key, token in listing.items():
            # Also when the file is gone: another process sharing the cache, with an
            # older listing, may have removed it.
            if _mirrored_kind(key) and (self._mirrored.get(key) != token
                                        or not (self.root / key).is_file()):
                self._mirror(key, token)
        for path in self._cached_pointers():  # removed from the bucket: forget it
            key = path.relative_to(self.root).as_posix()
            if key not in listing:
                if key.endswith("/" + MANIFEST):  # the version's files go with it
                    shutil.rmtree(path.parent, ignore_errors=True)
                path.unlink(missing_ok=True)
                self._mirrored.pop(key, None)
        self._listing = listing
        self._listed_at = time.monotonic()

    def _cached_pointers(self) -> list[Path]:
        """The manifests and defaults in the cache."""
        return [p for p in [*self.root.glob(f"*/{DEFAULT}"), *self.root.glob(f"*/*/{MANIFEST}")]
                if _mirrored_kind(p.relative_to(self.root).as_posix())]

    def _mirror(self, key: str, token: str) -> None:
        try:
            data = self.store.read(key)
        except Exception as exc:  # gone between list and read, say: the next refresh
            logger.warning("model repository %s: reading %s failed (%s)", self.store.url,
                           key, _short(exc))
            return
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data.decode("utf-8", "replace"))
        self._mirrored[key] = token

    def names(self) -> list[str]:
        self.refresh()
        return super().names()

    def versions(self, name: str) -> list[int]:
        self.refresh()
        return super().versions(name)

    def default(self, name: str) -> dict[str, Any]:
        self.refresh()
        return super().default(name)

    # -- artifacts -----------------------------------------------------------------------
    def materialize(self, version: ModelVersion) -> ModelVersion:
        """Download the version's files into the cache once, sha256 checked before they
        are moved in. The files are current while the marker in the version's folder
        holds the hash of the manifest they were downloaded for: a version number
        reused, or files replaced in the bucket under a new manifest, are downloaded
        again. Only this version's downloads wait on each other."""
        self._inside(version.artifact)
        folder = version.path.relative_to(self.root).as_posix() + "/"
        current = _manifest_hash(version)
        with self._version_lock(folder):
            if _read(version.path / FETCHED) == current:
                return version
            try:
                keys = [k for k in self.store.listing(folder) if _version_file(k, folder)]
            except Exception as exc:
                raise InferqError(f"model {version.key}: {self.store.url}{folder} cannot be "
                                  f"listed ({_short(exc)}); its files are not cached yet"
                                  ) from None
            self._download(version, folder, keys)
            write_atomic(version.path / FETCHED, current)
        return version

    def _version_lock(self, folder: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(folder, threading.Lock())

    def _download(self, version: ModelVersion, folder: str, keys: list[str]) -> None:
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=self.root) as tmp:
            fetched = {}
            for i, key in enumerate(keys):
                final = self._inside(self.root / key)
                local = Path(tmp) / str(i)
                self.store.download(key, local)
                fetched[local] = final
            self._check(version, folder, fetched)
            for local, final in fetched.items():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(local, final)
        logger.info("model %s: downloaded %d files from %s", version.key, len(keys),
                    self.store.url)

    def _check(self, version: ModelVersion, folder: str, fetched: dict[Path, Path]) -> None:
        where = f"{self.store.url}{folder}{version.manifest.artifact}"
        local = next((p for p, final in fetched.items() if final == version.artifact), None)
        if local is None:
            raise ModelNotFound(f"model {version.key}: {where} is missing from the bucket")
        want, got = version.manifest.artifact_sha256, sha256_file(local)
        if want and got != want:
            raise ModelCorrupt(f"model {version.key}: {where} has sha256 {got[:12]}…, its "
                               f"manifest says {want[:12]}…; refused (rebuild or restore "
                               "the object)")

    # -- publishing ----------------------------------------------------------------------
    def next_version(self, name: str) -> int:
        """Past every number in the bucket, claimed or published."""
        numbers = [int(part[1]) for part in (k.split("/") for k in self._listing)
                   if len(part) >= 3 and part[0] == name and _is_version(part[1])]
        return max([*numbers, *super().versions(name), 0]) + 1

    def _intact(self, version: ModelVersion) -> bool:
        return True  # the bucket's copy is checked against its sha256 when downloaded

    def _place(self, staged: Path, manifest: Manifest) -> ModelVersion:
        self.refresh(force=True)
        for _ in range(20):  # another publisher may claim the number first
            version = self.next_version(manifest.name)
            folder = f"{manifest.name}/{version}/"
            if not self.store.create(folder + CLAIM, utc_now().encode()):
                self.refresh(force=True)
                continue
            final = manifest.model_copy(update={"version": version})
            (staged / MANIFEST).write_text(final.model_dump_json(indent=2))
            files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST)
            for path in files:
                self.store.upload(path, folder + path.relative_to(staged).as_posix())
            self.store.upload(staged / MANIFEST, folder + MANIFEST)  # the version appears
            target = self.root / manifest.name / str(version)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staged, target)
            staged.mkdir()  # so the staging context has something to remove
            published = self.load(manifest.name, version)
            write_atomic(target / FETCHED, _manifest_hash(published))  # its files, here
            self._listed_at = -float("inf")  # published: a failing listing now is no error
            return published
        raise InferqError(f"could not claim a new version of {manifest.name} in "
                          f"{self.store.url}")

    def set_default(self, name: str, *, variant: str | None = None,
                    version: int | None = None) -> ModelVersion:
        if (variant is None) == (version is None):
            raise ValueError("give a variant or a version")
        self.refresh(force=True)
        target = self.resolve(ModelRef(name, variant, version))  # must exist
        data = json.dumps({"variant": variant, "version": version, "set_at": utc_now()},
                          indent=2)
        self.store.write(f"{name}/{DEFAULT}", data.encode())  # the pointer: one PUT
        self.refresh(force=True)
        return target

    def _unknown(self, name: str) -> str:
        have = ", ".join(self.names()) or "none"
        hint = getattr(self.store, "hint", "publish it there with `inferq models build` or "
                       "`inferq compress`")
        return f"unknown model {name!r} in {self.store.url} (it holds: {have}); {hint}"


def _manifest_hash(version: ModelVersion) -> str:
    return hashlib.sha256(version.manifest.model_dump_json().encode()).hexdigest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _is_version(part: str) -> bool:
    return part.isascii() and part.isdigit() and len(part) <= MAX_VERSION_DIGITS


def _mirrored_kind(key: str) -> bool:
    """A manifest (``name/N/manifest.json``) or a default (``name/default.json``) with a
    valid name and version: nothing else from the bucket is written by a refresh."""
    parts = key.split("/")
    if not parts or not MODEL_NAME.fullmatch(parts[0]):
        return False
    return ((len(parts) == 2 and parts[1] == DEFAULT)
            or (len(parts) == 3 and _is_version(parts[1]) and parts[2] == MANIFEST))


def _version_file(key: str, folder: str) -> bool:
    """A file of the version other than its manifest and claim, at a plain relative path."""
    rest = key[len(folder):]
    parts = PurePosixPath(rest).parts
    return (key.startswith(folder) and bool(rest) and rest not in (MANIFEST, CLAIM)
            and not rest.startswith("/") and ".." not in parts and "." not in parts
            and not rest.endswith("/"))


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
