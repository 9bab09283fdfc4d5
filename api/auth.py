"""Bearer API keys, each mapped to a tenant. Only SHA-256 hashes are kept in memory.

Keys come from ``INFERQ_API_KEYS`` (``tenant:key,...``, handy for development) and
``INFERQ_API_KEYS_FILE`` (JSON written by ``inferq api-key add``: hashes only, never keys).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.settings import Settings

KEY_PREFIX = "iq_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant, which key (its id, never the key), its limits."""

    tenant: str
    key_id: str
    rate_per_s: int | None = None  # None: the server's default
    callback_secret: str = ""
    queue_share: float | None = None  # None: the server's INFERQ_API_TENANT_QUEUE_SHARE
    client: str | None = None  # the caller's address in this request, for the audit log


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _check_tenant(tenant: str, where: str) -> str:
    if not tenant or not all(c.isalnum() or c in "._-" for c in tenant) or len(tenant) > 64:
        raise ConfigError(f"{where}: tenant {tenant!r} is invalid (1-64 letters, digits, "
                          "'.', '_' or '-')")
    return tenant


class Keyring:
    def __init__(self, entries: dict[str, Principal]):
        self._by_hash = entries

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        entries: dict[str, Principal] = {}
        for n, pair in enumerate(p.strip() for p in settings.api_keys.split(",")):
            if not pair:
                continue
            tenant, sep, key = pair.partition(":")
            if not sep or not key:
                raise ConfigError(f"INFERQ_API_KEYS: entry {n + 1} is not tenant:key")
            digest = hash_key(key)
            entries[digest] = Principal(_check_tenant(tenant, "INFERQ_API_KEYS"), digest[:12])
        if settings.api_keys_file is not None:
            entries.update(_read_file(settings.api_keys_file))
        return cls(entries)

    def secret_for(self, key_id: str) -> str:
        """The callback signing secret of a key (by id), or "" for the server's."""
        for who in self._by_hash.values():
            if who.key_id == key_id:
                return who.callback_secret
        return ""

    def authenticate(self, key: str) -> Principal | None:
        digest = hash_key(key)
        found = self._by_hash.get(digest)
        # The dict lookup is by hash, so timing says nothing about the key; compare anyway.
        if found is not None and hmac.compare_digest(found.key_id, digest[:12]):
            return found
        return None


def _read_file(path: Path) -> dict[str, Principal]:
    where = f"INFERQ_API_KEYS_FILE ({path})"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read it: {exc}") from None
    entries: dict[str, Principal] = {}
    for n, item in enumerate(data.get("keys", []) if isinstance(data, dict) else []):
        try:
            digest = str(item["sha256"])
            entries[digest] = Principal(
                _check_tenant(str(item["tenant"]), where), digest[:12],
                int(item["rate_per_s"]) if item.get("rate_per_s") is not None else None,
                str(item.get("callback_secret", "")), _share(item.get("queue_share")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: key {n + 1}: {exc!r} (needs tenant and sha256)"
                              ) from None
    return entries


def _share(value: Any) -> float | None:
    if value is None:
        return None
    share = float(value)
    if not 0 < share <= 1:
        raise ValueError(f"queue_share {share} is not in (0, 1]")
    return share


def add_key(path: Path, tenant: str, rate_per_s: int | None = None,
            queue_share: float | None = None) -> tuple[str, str, str]:
    """Append a new key for ``tenant`` to the keys file; -> (key, key id, callback secret).

    The key itself is shown once and never stored; the callback secret (to verify the
    signatures of callbacks) is stored, as the server signs with it.
    """
    _check_tenant(tenant, "--tenant")
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"keys": []}
    key = new_key()
    digest = hash_key(key)
    secret = secrets.token_hex(32)
    entry: dict[str, Any] = {"tenant": tenant, "sha256": digest, "callback_secret": secret}
    if rate_per_s is not None:
        entry["rate_per_s"] = rate_per_s
    if queue_share is not None:
        entry["queue_share"] = _share(queue_share)
    data["keys"].append(entry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return key, digest[:12], secret
