"""Model versions through a real worker: hot reload, rollback, pinning, corrupt artifacts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from shared.repository import ModelRepository
from tests.conftest import client_for

pytestmark = pytest.mark.integration


@pytest.fixture
def own_repo(model_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the built repository, so a test can add versions to it."""
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)
    return root


def _republish(repo: ModelRepository, version: int, note: str) -> int:
    """Publish a copy of an existing version as the newest one."""
    source = repo.load("digits", version)
    with repo.staging("digits") as tmp:
        shutil.copy(source.artifact, tmp / source.manifest.artifact)
        return repo.publish(tmp, source.manifest.model_copy(update={"notes": note})
                            ).manifest.version


def _served_version(client, x: np.ndarray, want: int, timeout: float = 30) -> int:
    """Submit until the worker serves version ``want`` (it re-reads the repository every
    few seconds); return the version the last job ran on."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = client.wait(client.submit("digits", x).id, timeout=30).version
        if seen == want:
            return seen
        time.sleep(0.2)  # the worker's repository cache expires on a timer
    return seen


def test_new_version_and_rollback_without_restart(redis_env, own_repo, start_worker, digits):
    env = {**redis_env, "INFERQ_MODEL_REPO": str(own_repo)}
    worker = start_worker(env)
    client = client_for(env)
    x = digits["x"][7]
    assert client.wait(client.submit("digits", x).id, timeout=30).version == 1
    repo = ModelRepository(own_repo)
    new = _republish(repo, 1, "a retrained copy")
    assert _served_version(client, x, new) == new  # hot reload, no restart
    repo.set_default("digits", version=1)  # rollback
    assert _served_version(client, x, 1) == 1
    pinned = client.wait(client.submit(f"digits@{new}", x).id, timeout=30)
    assert pinned.version == new and pinned.outputs["label"][0] == digits["label"][7]
    assert worker.proc.poll() is None


def test_a_corrupted_artifact_is_refused(redis_env, own_repo, start_worker):
    artifact = own_repo / "digits" / "1" / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    env = {**redis_env, "INFERQ_MODEL_REPO": str(own_repo)}
    worker = start_worker(env, ready=False)
    assert worker.proc.wait(timeout=60) != 0
    log = worker.log.read_text()
    assert "sha256" in log and "corrupted" in log
