"""HMAC-SHA256 signatures of callback bodies (Stripe's scheme): ``t=<unix>,v1=<hex>``
over ``"<t>." + body``. Standard library only, so a receiver can copy this file."""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Inferq-Signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300.0) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is recent (replays fail)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
