"""``inferq models build``: the bundled models and their variants, with defaults chosen
from what was measured, not hard-coded."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.repository import ModelRepository, ModelVersion

logger = logging.getLogger(__name__)

BUNDLED = ("digits", "minilm")


def build_bundled(repo_root: Path, names: list[str] | None = None, *,
                  if_missing: bool = False) -> list[ModelVersion]:
    """Build each bundled model (fp32 and its variants); return what was published."""
    repo = ModelRepository(repo_root)
    built: list[ModelVersion] = []
    for name in names or list(BUNDLED):
        if name not in BUNDLED:
            raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
        if if_missing and repo.versions(name):
            logger.info("%s is already built; keeping it", name)
            continue
        built += _BUILDERS[name](repo)
    return built


def _digits(repo: ModelRepository) -> list[ModelVersion]:
    from workers.build.digits import build_digits
    from workers.build.digits_variants import build_digits_variants

    parent = build_digits(repo.root)
    variants = build_digits_variants(repo.root, parent)
    int8 = variants.get("int8")
    if int8 is not None and _meets_digits_int8(int8):
        repo.set_default("digits", variant="int8")
    else:
        repo.set_default("digits", variant="fp32")
    return [parent, *variants.values()]


def _meets_digits_int8(version: ModelVersion) -> bool:
    """The served default must cost at most 0.5 accuracy points and be faster than fp32."""
    q, s = version.manifest.quality, version.manifest.speed
    return q.get("accuracy_delta_vs_parent", -1.0) >= -0.005 and s.get("speedup_vs_parent", 0) > 1


def _minilm(repo: ModelRepository) -> list[ModelVersion]:
    from workers.build.minilm import build_minilm

    return list(build_minilm(repo.root).values())  # sets its own default from its figures


_BUILDERS = {"digits": _digits, "minilm": _minilm}
