"""Hostile model references: names, variants and versions from users (and from messages)
never reach a file outside the model repository, and neither does a symlink inside it.

Reads are watched with an audit hook (``open``, ``os.listdir``, ``os.scandir``), so "never
read outside" is checked on what the process actually opened, not inferred from the error.
The results API is exercised in process (``httpx.ASGITransport``): such names answer 404 or
422, never 500, and nothing Redis-backed is reached (no rate limit, no callbacks).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidModelName, ModelNotFound, UnsafeModelPath
from shared.repository import ModelRef, ModelRepository, parse_model_ref
from shared.schemas import MODEL_NAME, Manifest, Preprocessing, TensorSpec
from tests.conftest import REDIS, REDIS_TEST_DB

CANARY = "canary-outside-the-repository"
PROFILE = settings(max_examples=200, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])

# What a user might type for a name, variant or version: traversal, absolute paths,
# separators, NUL, percent-encoding, look-alikes, lengths, and the reference syntax itself.
HOSTILE_REFS = [
    "..", ".", "../../etc/passwd", "/etc/passwd", "/", "\\", "..\\..\\windows", "m/../other",
    "m\x00", "m\x00/../../etc/passwd", "\x00", "%2e%2e", "%2e%2e%2fetc%2fpasswd", "m%2f..",
    "..%00", "ｍ", "м", "ṁ", "m\u200b", "m\u0301", "M", "m\n", " m", "m ", "~", "~root",
    "a" * 65, "a" * 10_000, "m@../x", "m@../../x", "m:../../x", "m:..", "m:/etc",
    "m:fp32@../../x", "m@-1", "m@0", "m@00", "m@1e3", "m@+1", "m@0x1", "m@ 1", "m@1.0",
    "m@１", "m@٣", "m@1/../2", "m@" + "9" * 19, "m@" + "1" * 5000, "m:" + "v" * 33,
    "m:FP32", "m:fp32:int8", "m@1@2", "digits@../x", "digits:../../x", "",
]


# -- watching reads --------------------------------------------------------------------------
class _Reads:
    """Paths the process opened or listed while recording (a process-wide audit hook,
    installed once: audit hooks cannot be removed)."""

    installed = False
    paths: list[str] | None = None

    @classmethod
    def hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls.paths is not None and event in ("open", "os.listdir", "os.scandir") and args:
            path = args[0]
            if isinstance(path, (str, bytes, os.PathLike)):
                cls.paths.append(os.fsdecode(path))


@contextlib.contextmanager
def reads() -> Iterator[list[str]]:
    if not _Reads.installed:
        sys.addaudithook(_Reads.hook)
        _Reads.installed = True
    _Reads.paths = seen = []
    try:
        yield seen
    finally:
        _Reads.paths = None


def assert_nothing_read_in(seen: list[str], *places: Path) -> None:
    for raw in seen:
        real = Path(os.path.realpath(raw))
        for place in places:
            assert not real.is_relative_to(place.resolve()), f"read {raw} -> {real}"
        assert str(real) not in ("/etc/passwd", "/etc/shadow"), raw


# -- a repository with traps -----------------------------------------------------------------
def write_version(folder: Path, name: str, version: int, **extra: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx bytes of " + name.encode())
    manifest = Manifest(name=name, version=version,
                        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
                        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1])], **extra)
    (folder / "manifest.json").write_text(manifest.model_dump_json())
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A complete model tree and secrets next to (not inside) the repository."""
    place = tmp_path / "outside"
    write_version(place / "evil" / "1", "evil", 1, notes=CANARY)
    (place / "secret.txt").write_text(CANARY)
    (place / "default.json").write_text(json.dumps({"version": 1, "note": CANARY}))
    return place


@pytest.fixture
def repo(tmp_path: Path, outside: Path) -> ModelRepository:
    root = tmp_path / "models"
    write_version(root / "m" / "1", "m", 1)
    write_version(root / "m" / "2", "m", 2)
    # Traps: a model folder, a version folder and a manifest that are symlinks outside.
    (root / "linked").symlink_to(outside / "evil")
    (root / "m" / "7").symlink_to(outside / "evil" / "1")
    (root / "m" / "8").mkdir()
    (root / "m" / "8" / "manifest.json").symlink_to(outside / "evil" / "1" / "manifest.json")
    return ModelRepository(root)


def test_the_traps_are_real(repo: ModelRepository, outside: Path) -> None:
    """The control: without the checks, each trap would lead to a readable file outside."""
    assert CANARY in (repo.root / "linked" / "1" / "manifest.json").read_text()
    assert CANARY in (repo.root / "m" / "7" / "manifest.json").read_text()
    assert CANARY in (repo.root / "m" / "8" / "manifest.json").read_text()


# -- references ------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", HOSTILE_REFS, ids=lambda r: repr(r)[:40])
def test_hostile_references_are_refused_without_reading_outside(
        repo: ModelRepository, outside: Path, ref: str) -> None:
    with reads() as seen, pytest.raises(InvalidModelName) as info:
        repo.resolve(ref)
    assert_nothing_read_in(seen, outside)
    assert len(str(info.value)) < 300, "the message echoes the whole reference"
    with pytest.raises(InvalidModelName):
        parse_model_ref(ref)


@pytest.mark.parametrize("ref", ["m@3", "m@999999999999999999", "nope", "m:int8", "evil"])
def test_well_formed_but_missing_references_are_not_found(repo: ModelRepository,
                                                          outside: Path, ref: str) -> None:
    with reads() as seen, pytest.raises(ModelNotFound):
        repo.resolve(ref)
    assert_nothing_read_in(seen, outside)


@pytest.mark.parametrize("fields", [
    ("m", None, "../../outside"), ("m", None, "1"), ("m", None, -1), ("m", None, 0),
    ("m", None, True), ("m", None, 1.0), ("m", None, 10**30), ("m", "../x", None),
    ("m", "", None), ("m", "/etc", None), ("../outside", None, None), ("/etc", None, None),
    ("", None, None), (None, None, None), ("m\x00", None, None), (b"m", None, None),
], ids=repr)
def test_refs_built_from_message_fields_are_checked(fields: tuple[Any, Any, Any]) -> None:
    """Workers build refs from message fields (workers/pool.py), never through parsing."""
    with pytest.raises(InvalidModelName):
        ModelRef(*fields)


@pytest.mark.parametrize("version", ["../../outside/evil/1", "../linked/1", -1, 0, True, "2"])
def test_load_checks_the_version_it_is_given(repo: ModelRepository, outside: Path,
                                             version: Any) -> None:
    with reads() as seen, pytest.raises(InvalidModelName):
        repo.load("m", version)
    assert_nothing_read_in(seen, outside)


@pytest.mark.parametrize("name", ["../outside", "..", "/tmp", "m/../linked", "linked/.."])
def test_every_entry_point_checks_the_name(repo: ModelRepository, outside: Path,
                                           name: str) -> None:
    with reads() as seen:
        for call in (repo.versions, repo.default, repo.all, repo.next_version,
                     lambda n: repo.load(n, 1), lambda n: repo.resolve(ModelRef(n))):
            with pytest.raises(InvalidModelName):
                call(name)
        with pytest.raises(InvalidModelName), repo.staging(name):
            pass
    assert_nothing_read_in(seen, outside)
    assert not (outside.parent / "tmp").exists()


@PROFILE
@given(ref=st.text(max_size=80) | st.from_regex(r"[a-z.\\/%0-9:@\x00-]{0,40}",
                                                fullmatch=True))
def test_any_text_is_a_clean_refusal_or_a_model_inside(repo: ModelRepository, outside: Path,
                                                       ref: str) -> None:
    with reads() as seen:
        try:
            found = repo.resolve(ref)
        except (InvalidModelName, ModelNotFound):
            found = None
    assert_nothing_read_in(seen, outside)
    if found is not None:
        assert found.path.resolve().is_relative_to(repo.root.resolve())
        assert MODEL_NAME.fullmatch(found.manifest.name)


# -- symlinks --------------------------------------------------------------------------------
def test_a_symlinked_model_folder_is_refused_and_not_listed(repo: ModelRepository,
                                                            outside: Path) -> None:
    with reads() as seen:
        assert repo.names() == ["m"]
        with pytest.raises(UnsafeModelPath, match="outside the model repository") as info:
            repo.resolve("linked")
        with pytest.raises(UnsafeModelPath):
            repo.versions("linked")
        with pytest.raises(UnsafeModelPath):
            repo.load("linked", 1)
        with pytest.raises(UnsafeModelPath), repo.staging("linked"):
            pass
    assert_nothing_read_in(seen, outside)
    assert str(outside) not in str(info.value), "the message names the symlink's target"
    assert isinstance(info.value, ModelNotFound)  # the API answers 404, not 500


def test_symlinked_versions_and_manifests_are_skipped_and_refused(repo: ModelRepository,
                                                                  outside: Path) -> None:
    with reads() as seen:
        assert repo.versions("m") == [1, 2]
        assert repo.resolve("m").key == "m@2"
        for version in (7, 8):
            with pytest.raises(UnsafeModelPath):
                repo.load("m", version)
            with pytest.raises(UnsafeModelPath):
                repo.resolve(f"m@{version}")
    assert_nothing_read_in(seen, outside)


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_an_artifact_outside_the_repository_is_refused(repo: ModelRepository,
                                                       outside: Path, where: str) -> None:
    folder = repo.root / "m" / "3"
    if where == "symlink":
        write_version(folder, "m", 3)
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(outside / "secret.txt")
    else:
        target = "../../../outside/secret.txt" if where == "relative" else \
            str(outside / "secret.txt")
        write_version(folder, "m", 3, artifact=target)
    with reads() as seen:
        for call in (lambda: repo.load("m", 3), lambda: repo.resolve("m@3"),
                     lambda: repo.resolve("m")):
            with pytest.raises(UnsafeModelPath):
                call()
    assert_nothing_read_in(seen, outside)


def test_a_tokenizer_outside_the_repository_is_refused(repo: ModelRepository,
                                                       outside: Path) -> None:
    write_version(repo.root / "m" / "3", "m", 3,
                  preprocessing=Preprocessing(kind="text", tokenizer="../../../outside/x"))
    with pytest.raises(UnsafeModelPath):
        repo.load("m", 3)


def test_a_symlinked_default_is_refused(repo: ModelRepository, outside: Path) -> None:
    (repo.root / "m" / "default.json").symlink_to(outside / "default.json")
    with reads() as seen:
        with pytest.raises(UnsafeModelPath):
            repo.default("m")
        with pytest.raises(UnsafeModelPath):
            repo.resolve("m")
    assert_nothing_read_in(seen, outside)


def test_symlinks_that_stay_inside_are_fine(tmp_path: Path) -> None:
    """The control: a symlinked repository root, and a version sharing another's
    artifact through a symlink, still resolve."""
    real = tmp_path / "real-models"
    write_version(real / "m" / "1", "m", 1)
    folder = write_version(real / "m" / "2", "m", 2)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(Path("..") / "1" / "model.onnx")
    (tmp_path / "models").symlink_to(real)
    repo = ModelRepository(tmp_path / "models")
    assert repo.names() == ["m"]
    found = repo.resolve("m")
    assert found.key == "m@2"
    assert found.artifact.read_bytes() == b"onnx bytes of m"


# -- the results API -------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def api(repo: ModelRepository, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app over the trapped repository: no rate limit and no callback dispatcher, so no
    request here needs Redis (hostile names are refused before anything is enqueued)."""
    from api.app import create_app
    from shared.settings import load_settings

    url = f"{REDIS}/{REDIS_TEST_DB}"
    settings = load_settings(broker_url=url, result_backend=url, model_repo=repo.root,
                             home=tmp_path / "home", api_keys="acme:key-a", api_rate_per_s=0,
                             queue_prefix="hostile.")
    app = create_app(settings, callbacks=False)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://inferq.test",
            headers={"Authorization": "Bearer key-a"}) as client:
        yield client


# Path segments as a client sends them (percent-encoded where a URL needs it).
API_NAMES = ["..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2Fetc%2Fpasswd", "%00", "m%00",
             "%5C", "..%5C..%5Cx", "%EF%BD%8D", "%D0%BC", "a" * 65, "a" * 4000, "M",
             "m@..%2F..%2Fx", "m@..", "m:..%2F..%2Fx", "m@-1", "m@0", "m@" + "1" * 5000,
             "digits@..%2Fx", "digits:..%2F..%2Fx", "linked", "m@7", "m@8", "evil", "nope",
             "%252e%252e"]


@pytest.mark.anyio
@pytest.mark.parametrize("name", API_NAMES, ids=lambda n: n[:30])
async def test_api_answers_hostile_names_with_4xx(api: httpx.AsyncClient, outside: Path,
                                                  name: str) -> None:
    with reads() as seen:
        answers = [await api.get(f"/v1/models/{name}"),
                   await api.post(f"/v1/models/{name}/jobs", json={"inputs": [1, 2, 3, 4]})]
    assert_nothing_read_in(seen, outside)
    for r in answers:
        assert r.status_code in (404, 422), (r.status_code, r.text)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["detail"]
        assert CANARY not in r.text and str(outside) not in r.text
        assert "Traceback" not in r.text and len(r.text) < 1000


@pytest.mark.anyio
async def test_api_lists_only_models_inside(api: httpx.AsyncClient, outside: Path) -> None:
    with reads() as seen:
        r = await api.get("/v1/models")
        one = await api.get("/v1/models/m")
    assert_nothing_read_in(seen, outside)
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()] == ["m"]
    assert one.status_code == 200 and one.json()["version"] == 2


@pytest.mark.parametrize("content", ['{"version": "3"}', '{"version": -1}', '{"version": true}',
                                     '{"variant": "../x"}', '[1]', '{not json'])
def test_a_malformed_default_file_is_a_clear_model_error(tmp_path, content):
    from shared.errors import ModelNotFound
    from shared.repository import ModelRepository

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "default.json").write_text(content)
    with pytest.raises(ModelNotFound, match="default.json is malformed"):
        ModelRepository(tmp_path).default("m")
