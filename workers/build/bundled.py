"""``inferq models build``: the bundled models and their variants, with defaults chosen
from what was measured, not hard-coded.

Rebuilding is safe: the builds are deterministic, so an artifact that is already
published is reused, not published again (``ModelRepository.publish(reuse_identical=)``);
a default someone set (``inferq models default``) is kept; and every change of what a
bare model name serves is reported, never made silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ModelNotFound
from shared.repository import ModelRepository, ModelVersion, as_repository

logger = logging.getLogger(__name__)

BUNDLED = ("digits", "minilm")


@dataclass
class Built:
    """What a build did: every version it stands for, which of them are new, and what
    changed in what the bare names serve (one line each, for people)."""

    versions: list[ModelVersion] = field(default_factory=list)
    new: list[ModelVersion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_bundled(repo_root: ModelRepository | Path, names: list[str] | None = None, *,
                  if_missing: bool = False, say: Callable[[str], None] = logger.info
                  ) -> Built:
    """Build each bundled model (fp32 and its variants) into ``repo_root``; ``say`` gets
    each change of what a bare name serves as it is made (a later model's build may
    still fail)."""
    repo = as_repository(repo_root)
    built = Built()
    unknown = [n for n in names or () if n not in BUNDLED]
    if unknown:  # before building anything
        raise ValueError(f"unknown bundled model {unknown[0]!r}; bundled: "
                         f"{', '.join(BUNDLED)}")
    for name in names or list(BUNDLED):
        known = set(repo.versions(name))
        if if_missing and known:
            logger.info("%s is already built; keeping it", name)
            continue
        before, chosen = _serving(repo, name), repo.default(name)
        versions, measured = _BUILDERS[name](repo)
        built.versions += versions
        built.new += [v for v in versions if v.manifest.version not in known]
        notes = _set_default(repo, name, measured, chosen, before)
        for note in notes:
            say(note)
        built.notes += notes
    return built


def _serving(repo: ModelRepository, name: str) -> str | None:
    """What the bare name serves, as ``digits@2 (int8)``; None: nothing yet."""
    try:
        version = repo.resolve(name)
    except ModelNotFound:
        return None
    return f"{version.key} ({version.manifest.variant})"


def _set_default(repo: ModelRepository, name: str, measured: str, chosen: dict[str, object],
                 before: str | None) -> list[str]:
    """Serve the measured variant unless a default was set before the build (a person's
    choice, or an earlier build's, which then already follows the newest version of its
    variant); -> the lines that say what the bare name serves now, if that changed."""
    if chosen:
        now, pick = _serving(repo, name), ", ".join(f"{k} {v}" for k, v in chosen.items())
        lines = []
        if now != before:
            lines.append(f"{name} now serves {now}, was {before}: the newest version of "
                         f"the default set before ({pick})")
        if chosen.get("variant") != measured:
            lines.append(f"{name}: kept the default set before ({pick}); this build "
                         f"measured {measured} best: `inferq models default {name} "
                         f"{measured}` serves it")
        return lines
    repo.set_default(name, variant=measured)
    now = _serving(repo, name)
    if now == before:
        return []
    was = f", was {before}" if before else ""
    return [f"{name} now serves {now}{was}: the variant this build measured best; "
            f"`inferq models default {name} <variant or @version>` changes it"]


def _digits(repo: ModelRepository) -> tuple[list[ModelVersion], str]:
    from workers.build.digits import build_digits
    from workers.build.digits_variants import build_digits_variants

    parent = build_digits(repo, reuse_identical=True)
    variants = build_digits_variants(repo, parent, reuse_identical=True)
    int8 = variants.get("int8")
    measured = "int8" if int8 is not None and _meets_digits_int8(int8) else "fp32"
    return [parent, *variants.values()], measured


def _meets_digits_int8(version: ModelVersion) -> bool:
    """The served default must cost at most 0.5 accuracy points and be faster than fp32."""
    q, s = version.manifest.quality, version.manifest.speed
    return q.get("accuracy_delta_vs_parent", -1.0) >= -0.005 and s.get("speedup_vs_parent", 0) > 1


def _minilm(repo: ModelRepository) -> tuple[list[ModelVersion], str]:
    from workers.build.minilm import build_minilm, measured_default

    published = build_minilm(repo, set_default=False, reuse_identical=True)
    return list(published.values()), measured_default(published) or "fp32"


_BUILDERS = {"digits": _digits, "minilm": _minilm}
