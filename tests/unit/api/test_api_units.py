"""Pure unit tests of the results API's parts: API keys (hashes only), callback signatures,
``?wait=`` parsing, secret scrubbing, callback backoff, and the body-size middleware."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from api import callbacks
from api.app import scrub
from api.auth import KEY_PREFIX, Keyring, add_key, hash_key
from api.jobs import parse_wait
from api.limits import BodyLimit
from shared import signing
from shared.errors import ConfigError, InputError
from shared.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def keyring(keys: str = "", keys_file: Path | None = None) -> Keyring:
    return Keyring.from_settings(Settings(api_keys=keys, api_keys_file=keys_file))


# -- API keys --------------------------------------------------------------------------------
def test_keys_map_to_tenants_and_only_hashes_are_kept() -> None:
    ring = keyring(" acme:key-a , beta:key-b,, ")
    assert len(ring) == 2
    a, b = ring.authenticate("key-a"), ring.authenticate("key-b")
    assert a is not None and b is not None
    assert (a.tenant, b.tenant) == ("acme", "beta")
    assert a.key_id == hashlib.sha256(b"key-a").hexdigest()[:12] != b.key_id
    assert ring.authenticate("key-c") is None and ring.authenticate("") is None
    assert ring.authenticate("key-a ") is None  # exact match only
    assert "key-a" not in repr(vars(ring)) and hash_key("key-a") in vars(ring)["_by_hash"]


@pytest.mark.parametrize("keys", ["acme", "acme:", ":key", "a b:key", "x" * 65 + ":key"])
def test_bad_key_entries_are_config_errors(keys: str) -> None:
    with pytest.raises(ConfigError, match="INFERQ_API_KEYS"):
        keyring(keys)


def test_add_key_stores_the_hash_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, key_id, secret = add_key(path, "acme", rate_per_s=7, queue_share=0.2)
    key2, _, _ = add_key(path, "beta")
    text = path.read_text()
    assert key.startswith(KEY_PREFIX) and len(key) > 40 and key != key2
    assert key not in text and key2 not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = json.loads(text)["keys"]
    assert [e["tenant"] for e in entries] == ["acme", "beta"]
    ring = keyring("other:plain", keys_file=path)
    who = ring.authenticate(key)
    assert who is not None
    assert (who.tenant, who.key_id, who.rate_per_s, who.callback_secret, who.queue_share) \
        == ("acme", key_id, 7, secret, 0.2)
    beta = ring.authenticate(key2)
    assert beta is not None and beta.rate_per_s is None and beta.queue_share is None
    assert ring.secret_for(key_id) == secret and ring.secret_for("nope") == ""
    assert ring.authenticate("plain") is not None and len(ring) == 3


def test_add_key_refuses_a_bad_tenant(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tenant"):
        add_key(tmp_path / "keys.json", "no spaces")
    assert not (tmp_path / "keys.json").exists()


@pytest.mark.parametrize("content", ["not json", '{"keys": [{"tenant": "acme"}]}',
                                     '{"keys": [{"tenant": "a b", "sha256": "00"}]}',
                                     '{"keys": [{"tenant": "a", "sha256": "00", '
                                     '"queue_share": 2}]}'])
def test_a_bad_keys_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="INFERQ_API_KEYS_FILE"):
        keyring(keys_file=path)


# -- callback signatures ---------------------------------------------------------------------
BODY = b'{"event":"job.finished","job":{"id":"abc"}}'


def test_a_signature_verifies_with_its_secret_only() -> None:
    header = signing.sign("s3cret", BODY)
    t, v1 = header.split(",")
    assert t == f"t={int(t[2:])}" and abs(int(t[2:]) - time.time()) < 5
    assert v1.startswith("v1=") and len(v1) == 3 + 64
    assert signing.verify("s3cret", BODY, header)
    assert not signing.verify("other", BODY, header)


def test_a_tampered_body_or_signature_fails() -> None:
    header = signing.sign("s3cret", BODY)
    assert not signing.verify("s3cret", BODY.replace(b"abc", b"abd"), header)
    assert not signing.verify("s3cret", BODY + b" ", header)
    flipped = header[:-1] + ("0" if header[-1] != "0" else "1")
    assert not signing.verify("s3cret", BODY, flipped)
    # Moving the timestamp breaks the signature, which covers it.
    t = int(header.split(",")[0][2:])
    assert not signing.verify("s3cret", BODY, header.replace(f"t={t}", f"t={t + 1}"))


def test_an_old_or_future_signature_is_a_replay() -> None:
    now = int(time.time())
    assert signing.verify("s3cret", BODY, signing.sign("s3cret", BODY, now - 200))
    assert not signing.verify("s3cret", BODY, signing.sign("s3cret", BODY, now - 400))
    assert not signing.verify("s3cret", BODY, signing.sign("s3cret", BODY, now + 400))
    old = signing.sign("s3cret", BODY, now - 30)
    assert not signing.verify("s3cret", BODY, old, tolerance_s=10)


@pytest.mark.parametrize("header", ["", "garbage", "v1=00", "t=abc,v1=00", "t=1"])
def test_a_malformed_signature_header_fails(header: str) -> None:
    assert not signing.verify("s3cret", BODY, header)


# -- ?wait= ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("2s", 2.0), ("500ms", 0.5),
                                                ("3", 3.0), (" 1.5s ", 1.5), ("0", 0.0),
                                                ("0.25s", 0.25), ("90s", 30.0)])
def test_parse_wait(value: str | None, seconds: float) -> None:
    assert parse_wait(value, cap=30.0) == seconds


@pytest.mark.parametrize("value", ["", "abc", "-1s", "1m", "2 s", "1e3", "s", ".5s"])
def test_parse_wait_refuses_what_is_not_a_duration(value: str) -> None:
    with pytest.raises(InputError, match="wait: .* is not a duration") as caught:
        parse_wait(value, cap=30.0)
    assert caught.value.field == "wait"


# -- scrub -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "clean"), [
    ("redis://:hunter2@cache:6379/0 refused", "redis://:***@cache:6379/0 refused"),
    ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
    ("from rediss://u:p4ss@a/1 to redis://:x@b/2", "from rediss://u:***@a/1 to redis://:***@b/2"),
    ("redis://cache:6379/0 has no password", "redis://cache:6379/0 has no password"),
    ("Timeout connecting to server", "Timeout connecting to server"),
])
def test_scrub_drops_passwords(text: str, clean: str) -> None:
    assert scrub(text) == clean
    assert "hunter2" not in scrub(text) and "p4ss" not in scrub(text)


# -- callback backoff ------------------------------------------------------------------------
def test_backoff_doubles_with_jitter_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import backoff

    monkeypatch.setattr(backoff.random, "uniform", lambda low, high: high)
    assert [callbacks.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert callbacks.backoff(3, base=0.5) == 2.0
    assert callbacks.backoff(30) == callbacks.MAX_BACKOFF_S
    monkeypatch.setattr(backoff.random, "uniform", lambda low, high: low)
    assert [callbacks.backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert callbacks.backoff(30) == callbacks.MAX_BACKOFF_S / 2


def test_backoff_jitter_spreads_within_half_to_full() -> None:
    delays = [callbacks.backoff(4) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # really random, not one value


# -- BodyLimit -------------------------------------------------------------------------------
class Echo:
    """An ASGI app that reads the whole body and answers its length."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.calls += 1
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


async def post(app: Any, chunks: list[bytes], declared: int | None = None
               ) -> list[dict[str, Any]]:
    """Drive one POST through ``app``; the messages it sent."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    await app({"type": "http", "method": "POST", "path": "/", "headers": headers},
              receive, send)
    return sent


@pytest.mark.anyio
async def test_body_limit_refuses_a_declared_oversize_body_unread() -> None:
    echo = Echo()
    sent = await post(BodyLimit(echo, limit=100), [b"x" * 101], declared=101)
    assert sent[0]["status"] == 413 and echo.calls == 0
    assert b"INFERQ_API_MAX_BODY_BYTES" in sent[1]["body"]
    assert json.loads(sent[1]["body"])["detail"].startswith("request body over the limit of 100")


@pytest.mark.anyio
async def test_body_limit_refuses_a_streamed_oversize_body() -> None:
    echo = Echo()
    sent = await post(BodyLimit(echo, limit=100), [b"x" * 40] * 3)  # no Content-Length
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413 and echo.calls == 1
    # A lying Content-Length does not help either.
    sent = await post(BodyLimit(Echo(), limit=100), [b"x" * 60] * 2, declared=50)
    assert sent[0]["status"] == 413


@pytest.mark.anyio
async def test_body_limit_passes_bodies_up_to_the_limit() -> None:
    for chunks, declared in [([b"x" * 100], 100), ([b"x" * 50] * 2, None), ([b""], 0)]:
        sent = await post(BodyLimit(Echo(), limit=100), chunks, declared)
        assert sent[0]["status"] == 200
        assert sent[1]["body"] == str(sum(map(len, chunks))).encode()


@pytest.mark.anyio
async def test_body_limit_leaves_other_scopes_alone() -> None:
    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await BodyLimit(app, limit=1)({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


@pytest.mark.anyio
async def test_body_limit_under_fastapi_middleware_streamed() -> None:
    """Under an ``@app.middleware("http")`` (a task group), the overflow still answers 413."""
    app = FastAPI()

    @app.middleware("http")
    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    @app.post("/")
    async def read(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_middleware(BodyLimit, limit=1024)  # type: ignore[arg-type]

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 400

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/", content=chunks(2))).json() == {"size": 800}
        r = await client.post("/", content=chunks(3))
        assert r.status_code == 413 and "1024 bytes" in r.json()["detail"]
        r = await client.post("/", content=b"x" * 2000)  # declared
        assert r.status_code == 413


# -- callback URLs ---------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/x",
    "http://169.254.169.254/latest", "http://[::1]/x",
    # accepted before (issue 14): a cloud metadata service, carrier-grade NAT, 6to4 of
    # 127.0.0.1, IPv6 site-local; and the IPv4 carriers: mapped, NAT64, Teredo
    "http://100.100.100.200/latest/meta-data/", "http://100.64.0.1/",
    "http://[2002:7f00:1::]/", "http://[fec0::1]/", "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::a00:1]/", "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/",
    "http://0.0.0.0/", "http://[ff02::1]/"])
def test_internal_callback_addresses_are_refused_unless_allowed(url: str) -> None:
    from api.urls import UrlRefused, check_callback_url

    with pytest.raises(UrlRefused, match="not a public address"):
        check_callback_url(url, allow_private=False)
    assert check_callback_url(url, allow_private=True).startswith("http")


def test_a_host_label_over_63_characters_is_refused_not_a_500() -> None:
    from api.urls import UrlRefused, check_callback_url

    with pytest.raises(UrlRefused, match="cannot resolve"):
        check_callback_url(f"http://{'a' * 64}.example.com/hook", allow_private=False)


def test_a_delivery_connects_to_the_address_it_checked(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """No second lookup between the check and the connection (DNS rebinding): the target
    names the checked address, with the original Host and TLS server name."""
    import socket

    from api.urls import resolve_public

    answers = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))],
               [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))]]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers.pop(0))
    target = resolve_public("https://hooks.example.com:8443/x?y=1")
    assert target.url == "https://93.184.216.34:8443/x?y=1"
    assert target.headers == {"Host": "hooks.example.com:8443"}
    assert target.extensions == {"sni_hostname": "hooks.example.com"}
    assert len(answers) == 1  # resolved once


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "file:///etc/passwd"])
def test_callback_urls_must_be_http(url: str) -> None:
    from api.urls import UrlRefused, check_callback_url

    with pytest.raises(UrlRefused, match="callback_url"):
        check_callback_url(url, allow_private=True)


def test_a_job_is_checked_off_the_event_loop_when_that_may_block_or_take_long() -> None:
    """``_heavy``: a callback URL (its name is resolved) or more than HEAVY_ITEMS values;
    a row or a few rows of a small model stay on the loop, whatever their nesting."""
    import numpy as np

    from api.jobs import HEAVY_ITEMS, _heavy
    from api.schemas import JobRequest

    assert not _heavy(JobRequest(inputs=[0.0] * 784))  # one flat row
    assert not _heavy(JobRequest(inputs=[[0.0] * 64] * 64))  # 64 digits rows
    assert not _heavy(JobRequest(inputs="a sentence"))
    assert _heavy(JobRequest(inputs=[[0.0] * 784] * 64))  # 50,176 values
    assert _heavy(JobRequest(inputs={"image": np.zeros((HEAVY_ITEMS + 1,))}))
    assert _heavy(JobRequest(inputs=[0.0], callback_url="https://example.com/hook"))
