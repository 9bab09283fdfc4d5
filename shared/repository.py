"""The model repository: ``<root>/<name>/<version>/{manifest.json, artifact}``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.errors import ModelNotFound
from shared.schemas import MODEL_NAME, Manifest, check_model_name


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


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``digits`` or ``digits@3`` -> (name, version or None for the latest)."""
    name, _, version = ref.partition("@")
    check_model_name(name)
    if not version:
        return name, None
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise ModelNotFound(f"model version {version!r} is invalid: use a positive integer")
    return name, int(version)


class ModelRepository:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def versions(self, name: str) -> list[int]:
        check_model_name(name)
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name) for p in folder.iterdir()
            if p.name.isascii() and p.name.isdigit() and (p / "manifest.json").is_file()
        )

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and MODEL_NAME.fullmatch(p.name) and self.versions(p.name))

    def resolve(self, ref: str, version: int | None = None) -> ModelVersion:
        name, ref_version = parse_model_ref(ref)
        version = version or ref_version
        known = self.versions(name)
        if not known:
            have = ", ".join(self.names()) or "none"
            raise ModelNotFound(
                f"unknown model {name!r} in {self.root} (models here: {have}); "
                f"build the bundled ones with `inferq models build`"
            )
        chosen = version if version is not None else known[-1]
        if chosen not in known:
            raise ModelNotFound(f"model {name!r} has no version {chosen} (versions: {known})")
        path = self.root / name / str(chosen)
        manifest = Manifest.model_validate_json((path / "manifest.json").read_text())
        return ModelVersion(path=path, manifest=manifest)

    def next_version(self, name: str) -> int:
        known = self.versions(name)
        return (known[-1] + 1) if known else 1
