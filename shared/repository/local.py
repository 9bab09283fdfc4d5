"""The model repository: ``<root>/<name>/<version>/{manifest.json, artifact, ...}``.

A reference names a model, optionally a variant and a version: ``minilm``,
``minilm:int8``, ``minilm@3``. ``<root>/<name>/default.json`` says which variant (or
version) a bare name means, so the default lives in the repository, not in code; without
it a bare name means the newest ``fp32`` version. Versions are published atomically
(staged in a hidden folder, then renamed), so a reader never sees half a model.

Names, variants and versions are checked wherever they come in (from users, and from
messages), and every folder or file read must lie inside the repository once symlinks are
followed: neither a reference nor a symlink can reach other files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import InferqError, InvalidModelName, ModelNotFound, UnsafeModelPath
from shared.schemas import MODEL_NAME, Manifest, check_model_name, check_variant

MANIFEST = "manifest.json"
DEFAULT = "default.json"
MAX_REF = 128  # name (64) + ":" + variant (32) + "@" + version (18 digits), with room
MAX_VERSION_DIGITS = 18


class ModelCorrupt(InferqError):
    """The artifact on disk does not match the sha256 in its manifest."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    variant: str | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        """Refs are also built from message fields: check them here, not only when parsed."""
        _checked_name(self.name)
        if self.variant is not None:
            try:
                check_variant(self.variant)
            except ValueError as exc:
                raise InvalidModelName(str(exc)) from None
        if self.version is not None:
            _checked_version(self.version)

    def __str__(self) -> str:
        return (self.name + (f":{self.variant}" if self.variant else "")
                + (f"@{self.version}" if self.version else ""))


@dataclass(frozen=True)
class ModelVersion:
    path: Path
    manifest: Manifest

    @property
    def artifact(self) -> Path:
        return self.path / self.manifest.artifact

    @property
    def key(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def verify(self) -> None:
        """Refuse an artifact whose sha256 differs from the manifest's."""
        want = self.manifest.artifact_sha256
        if not want:
            return
        got = sha256_file(self.artifact)
        if got != want:
            raise ModelCorrupt(f"model {self.key}: {self.artifact} has sha256 {got[:12]}…, "
                               f"its manifest says {want[:12]}…; the file is corrupted or "
                               "was replaced — rebuild or restore it")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_model_ref(ref: str) -> ModelRef:
    """``name[:variant][@version]`` -> ModelRef; a malformed one raises InvalidModelName."""
    if not isinstance(ref, str):
        raise InvalidModelName(f"model reference {ref!r} is invalid: use name[:variant][@N]")
    if len(ref) > MAX_REF:
        raise InvalidModelName(f"model reference {ref[:24]!r}… of {len(ref)} characters is "
                               f"invalid: at most {MAX_REF}")
    rest, _, version = ref.partition("@")
    name, _, variant = rest.partition(":")
    if not version:
        return ModelRef(name, variant or None)
    if not (version.isascii() and version.isdigit()) or len(version) > MAX_VERSION_DIGITS:
        raise InvalidModelName(f"model version {version!r} is invalid: use a positive integer")
    return ModelRef(name, variant or None, int(version))


def _checked_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise InvalidModelName(str(exc)) from None


def _checked_version(version: int) -> int:
    if type(version) is not int or not 1 <= version < 10**MAX_VERSION_DIGITS:
        raise InvalidModelName(f"model version {version!r} is invalid: use a positive integer")
    return version


class ModelRepository:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def location(self) -> str:
        """Where the repository is, for messages: its folder, made absolute."""
        return str(self.root) if self.root.is_absolute() else str(self.root.resolve())

    def materialize(self, version: ModelVersion) -> ModelVersion:
        """Make the version's files readable at ``version.path`` (here they already are;
        a repository in a bucket downloads them into its cache)."""
        return version

    # -- confinement ---------------------------------------------------------------------
    def _is_inside(self, path: Path) -> bool:
        """Whether ``path``, symlinks followed, lies inside the repository."""
        return path.resolve().is_relative_to(self.root.resolve())

    def _inside(self, path: Path) -> Path:
        """``path`` if it lies inside the repository once symlinks are followed; else
        UnsafeModelPath (the message names it relative to the root, not its target)."""
        if not self._is_inside(path):
            shown = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            raise UnsafeModelPath(f"{shown} leads outside the model repository {self.root} "
                                  "(a symlink, or a path in a manifest); refused")
        return path

    # -- listing -------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if MODEL_NAME.fullmatch(p.name) and p.is_dir() and self._is_inside(p)
                      and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        folder = self.root / _checked_name(name)
        if not folder.is_dir():
            return []
        self._inside(folder)
        return sorted(
            int(p.name) for p in folder.iterdir()
            if p.name.isascii() and p.name.isdigit() and len(p.name) <= MAX_VERSION_DIGITS
            and self._is_inside(p / MANIFEST) and (p / MANIFEST).is_file()
        )

    def load(self, name: str, version: int) -> ModelVersion:
        path = self.root / _checked_name(name) / str(_checked_version(version))
        try:
            text = self._inside(path / MANIFEST).read_text()
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} has no version {version} "
                                f"(versions: {self.versions(name)})") from None
        manifest = Manifest.model_validate_json(text)
        self._inside(path / manifest.artifact)
        if manifest.preprocessing.tokenizer:
            self._inside(path / manifest.preprocessing.tokenizer)
        return ModelVersion(path=path, manifest=manifest)

    def all(self, name: str) -> list[ModelVersion]:
        return [self.load(name, v) for v in self.versions(name)]

    # -- the default ---------------------------------------------------------------------
    def default(self, name: str) -> dict[str, Any]:
        """``{"variant": "int8"}`` or ``{"version": 3}``; ``{}`` when none is set."""
        path = self.root / _checked_name(name) / DEFAULT
        if not path.is_file():
            return {}
        try:
            data = json.loads(self._inside(path).read_text())
            found = {k: data[k] for k in ("variant", "version") if data.get(k) is not None}
            if "version" in found and (type(found["version"]) is not int
                                       or found["version"] < 1):
                raise ValueError(f"version must be a positive integer, not "
                                 f"{found['version']!r}")
            if "variant" in found:
                check_variant(found["variant"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelNotFound(f"{name}/{DEFAULT} is malformed ({exc}); fix it with "
                                f"`inferq models default`") from None
        return found

    def set_default(self, name: str, *, variant: str | None = None,
                    version: int | None = None) -> ModelVersion:
        """Point the bare name at a variant (its newest version) or a version: a rollback."""
        if (variant is None) == (version is None):
            raise ValueError("give a variant or a version")
        target = self.resolve(ModelRef(name, variant, version))  # must exist
        data = {"variant": variant, "version": version, "set_at": utc_now()}
        write_atomic(self.root / name / DEFAULT, json.dumps(data, indent=2))
        return target

    # -- resolving -----------------------------------------------------------------------
    def resolve(self, ref: str | ModelRef, version: int | None = None) -> ModelVersion:
        r = parse_model_ref(ref) if isinstance(ref, str) else ref
        version = version or r.version
        known = self.versions(r.name)
        if not known:
            raise ModelNotFound(self._unknown(r.name))
        if version is not None:
            found = self.load(r.name, version)
            if r.variant and found.manifest.variant != r.variant:
                raise ModelNotFound(f"{r.name}@{version} is variant "
                                    f"{found.manifest.variant!r}, not {r.variant!r}")
            return found
        variant = r.variant
        if variant is None:
            default = self.default(r.name)
            if "version" in default:
                return self.load(r.name, int(default["version"]))
            variant = default.get("variant", "fp32")
        for v in reversed(known):
            found = self.load(r.name, v)
            if found.manifest.variant == variant:
                return found
        if r.variant is None and variant == "fp32":
            return self.load(r.name, known[-1])  # no fp32 and no default: the newest
        variants = sorted({m.manifest.variant for m in self.all(r.name)})
        raise ModelNotFound(f"model {r.name!r} has no variant {variant!r} "
                            f"(variants: {', '.join(variants)})")

    def _unknown(self, name: str) -> str:
        where = self.location
        fix = ("set INFERQ_MODEL_REPO to the repository's folder or build the "
               "bundled models there with `inferq models build`")
        if not self.root.is_dir():
            return (f"unknown model {name!r}: {where} (INFERQ_MODEL_REPO) does not exist; "
                    f"{fix}")
        have = ", ".join(self.names()) or "none"
        return f"unknown model {name!r} in {where} (INFERQ_MODEL_REPO; it holds: {have}); {fix}"

    # -- publishing ----------------------------------------------------------------------
    def next_version(self, name: str) -> int:
        known = self.versions(name)
        return (known[-1] + 1) if known else 1

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A hidden folder inside the repository to build a version in; removed on error."""
        folder = self._inside(self.root / _checked_name(name))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staged: Path, manifest: Manifest, *, reuse_identical: bool = False
                ) -> ModelVersion:
        """Give the staged folder the next version number, its manifest, and move it in.

        ``reuse_identical``: when a version of the same variant already has this very
        artifact (same sha256), return it and publish nothing (a rebuild from the same
        recipe makes no duplicate version)."""
        artifact = staged / manifest.artifact
        manifest = manifest.model_copy(update={
            "artifact_sha256": sha256_file(artifact),
            "size_bytes": artifact.stat().st_size,
            "created_at": manifest.created_at or utc_now(),
        })
        if reuse_identical:
            for known in reversed(self.all(manifest.name)):
                if (known.manifest.variant, known.manifest.artifact_sha256) == (
                        manifest.variant, manifest.artifact_sha256) and self._intact(known):
                    return known
        return self._place(staged, manifest)

    def _intact(self, version: ModelVersion) -> bool:
        """Its artifact still matches its manifest's sha256 (a corrupted one is not reused:
        the rebuild publishes a sound copy)."""
        try:
            version.verify()
        except (ModelCorrupt, OSError):
            return False
        return True

    def _place(self, staged: Path, manifest: Manifest) -> ModelVersion:
        """Move the staged folder in under the next free version number."""
        for _ in range(20):  # another build may take the number first
            version = self.next_version(manifest.name)
            final = manifest.model_copy(update={"version": version})
            (staged / MANIFEST).write_text(final.model_dump_json(indent=2))
            try:
                os.rename(staged, self.root / manifest.name / str(version))
            except OSError:
                continue
            staged.mkdir()  # so the staging context has something to remove
            return self.load(manifest.name, version)
        raise InferqError(f"could not publish a new version of {manifest.name}")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
