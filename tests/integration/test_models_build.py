"""`inferq models build` after `make demo` (which builds only digits fp32 v1), run as a
user would: no duplicate fp32 version, a change of what `digits` serves printed, and a
second build that publishes nothing."""

from __future__ import annotations

import json
import shutil

from shared.repository import ModelRepository
from tests.conftest import run_cli


def test_models_build_after_the_demo_adds_no_duplicates_and_says_what_changed(
        model_repo, tmp_path) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)  # the demo's repository: digits@1, fp32, no default
    repo = ModelRepository(root)
    env = {"INFERQ_MODEL_REPO": str(root)}

    first = run_cli(["models", "build", "digits"], env, timeout=600)
    assert first.returncode == 0, first.stderr
    variants = [repo.load("digits", v).manifest.variant for v in repo.versions("digits")]
    assert variants.count("fp32") == 1, variants  # the demo's v1, reused
    assert sorted(variants) == ["distilled", "fp32", "int8", "pruned", "torchscript"]
    served = repo.resolve("digits")
    serving = served.key
    if serving != "digits@1":  # int8 met its bar on this machine
        assert (f"digits now serves {serving} ({served.manifest.variant}), was digits@1 "
                "(fp32)") in first.stderr, first.stderr
    else:
        assert "now serves" not in first.stderr

    versions = repo.versions("digits")
    again = run_cli(["models", "build", "digits"], env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert repo.versions("digits") == versions
    assert repo.resolve("digits").key == serving
    assert "no new version" in again.stderr and "now serves" not in again.stderr

    listed = json.loads(run_cli(["models", "list", "--json"], env).stdout)
    assert len(listed) == len(versions)
