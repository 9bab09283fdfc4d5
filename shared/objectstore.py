"""Object storage for a model repository: ``s3://bucket/prefix`` through boto3, any other
scheme fsspec knows (``gs://``, ``az://``, ``memory://``) through fsspec.

A store is addressed by keys relative to its root (``digits/3/manifest.json``). Credentials
come only from the standard places (``AWS_*`` variables, ``~/.aws``, instance roles; for
fsspec, the backend's own); they never appear in a URL we print. An S3-compatible server
(MinIO, moto) is named by boto3's own ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.errors import ConfigError

SCHEMES_HINT = "s3://bucket/prefix (inferq[s3]), or gs://, az://... with fsspec installed"


class ObjectStore(Protocol):
    url: str  # what to show: scheme, bucket and prefix, never credentials

    def listing(self, prefix: str = "") -> dict[str, str]:
        """Every key under ``prefix`` -> a token that changes when the object does."""

    def read(self, key: str) -> bytes: ...

    def download(self, key: str, dest: Path) -> None: ...

    def write(self, key: str, data: bytes) -> None: ...

    def upload(self, src: Path, key: str) -> None: ...

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False when it did."""


def is_remote(location: str) -> bool:
    """Whether a repository location is a URL (``scheme://``) rather than a folder."""
    return "://" in location and not location.startswith("file://")


def open_store(url: str) -> ObjectStore:
    parts = urlsplit(url)
    if not parts.netloc:
        raise ConfigError(f"INFERQ_MODEL_REPO: {url!r} names no bucket; use {SCHEMES_HINT}")
    if parts.scheme == "s3":
        return S3Store(parts.netloc, parts.path.strip("/"))
    return FsspecStore(url)


class S3Store:
    """A bucket and a prefix on S3 or an S3-compatible server, through boto3."""

    def __init__(self, bucket: str, prefix: str):
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import ClientError
        except ImportError:
            raise ConfigError("INFERQ_MODEL_REPO: s3:// needs boto3: pip install "
                              "'inferq[s3]'") from None
        self.bucket, self.prefix = bucket, (prefix + "/" if prefix else "")
        self.url = f"s3://{bucket}/{self.prefix}"
        self._error = ClientError
        # Standard retries, bounded: a worker waiting on a bucket that is away keeps
        # serving what its cache holds.
        self._s3: Any = boto3.client("s3", config=Config(
            retries={"mode": "standard", "max_attempts": 4}, connect_timeout=5,
            read_timeout=60))

    def listing(self, prefix: str = "") -> dict[str, str]:
        found: dict[str, str] = {}
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix):]] = item["ETag"]
        return found

    def read(self, key: str) -> bytes:
        return bytes(self._s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
                     .read())

    def download(self, key: str, dest: Path) -> None:
        self._s3.download_file(self.bucket, self.prefix + key, str(dest))

    def write(self, key: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def upload(self, src: Path, key: str) -> None:
        self._s3.upload_file(str(src), self.bucket, self.prefix + key)

    def create(self, key: str, data: bytes) -> bool:
        try:  # S3's conditional write: one of two racing writers gets 412
            self._s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                IfNoneMatch="*")
        except self._error as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                             "ConditionalRequestConflict"):
                return False
            raise
        return True


class FsspecStore:
    """Any filesystem fsspec can open (``gs://`` with gcsfs, ``az://`` with adlfs, ...).
    ``create`` checks, then writes: not atomic on every backend (two publishers racing
    for one version number is then possible; S3's conditional write is)."""

    def __init__(self, url: str):
        try:
            from fsspec.core import url_to_fs
        except ImportError:
            raise ConfigError(f"INFERQ_MODEL_REPO: {urlsplit(url).scheme}:// needs fsspec "
                              f"and its backend; use {SCHEMES_HINT}") from None
        try:
            self._fs, root = url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"INFERQ_MODEL_REPO: cannot open {urlsplit(url).scheme}:// "
                              f"({exc}); use {SCHEMES_HINT}") from None
        self.root = root.rstrip("/")
        self.url = url.rstrip("/") + "/"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def listing(self, prefix: str = "") -> dict[str, str]:
        base = self._path(prefix)
        if not self._fs.exists(base):
            return {}
        found = {}
        for path, info in self._fs.find(base, detail=True).items():
            key = path.lstrip("/")[len(self.root.lstrip("/")) + 1:]
            token = [str(info.get(k)) for k in ("ETag", "etag", "md5Hash", "size",
                                                  "mtime", "created") if info.get(k)]
            found[key] = ":".join(token)
        return found

    def read(self, key: str) -> bytes:
        return bytes(self._fs.cat_file(self._path(key)))

    def download(self, key: str, dest: Path) -> None:
        self._fs.get_file(self._path(key), str(dest))

    def write(self, key: str, data: bytes) -> None:
        self._fs.pipe_file(self._path(key), data)

    def upload(self, src: Path, key: str) -> None:
        self._fs.put_file(str(src), self._path(key))

    def create(self, key: str, data: bytes) -> bool:
        if self._fs.exists(self._path(key)):
            return False
        self.write(key, data)
        return True
