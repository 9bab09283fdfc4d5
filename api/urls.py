"""Callback URLs a tenant may give: http(s) only, and by default only hosts whose every
address is publicly routable, checked when the job is submitted and again at each
delivery, which then connects to the address it checked (a name cannot resolve to a
public address for the check and to an internal one for the connection).

"Publicly routable" is stricter than ``ipaddress``'s ``is_global``: an IPv6 address that
carries an IPv4 one (mapped, 6to4, NAT64, Teredo) is judged by the IPv4 address it
reaches, and IPv6 site-local (fec0::/10) is internal.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

_URL = TypeAdapter(AnyHttpUrl)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """Where to deliver: the URL with the checked address in place of the name, the Host
    header and the TLS server name it needs."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.teredo is not None:
            return all(is_public(a) for a in address.teredo)
    return address.is_global and not address.is_multicast


def check_callback_url(url: str, allow_private: bool) -> str:
    """The URL, normalised; UrlRefused saying why it cannot be called back."""
    try:
        parsed = str(_URL.validate_python(url))
    except ValidationError as exc:
        raise UrlRefused(f"callback_url: {exc.errors()[0]['msg']}") from None
    if not allow_private:
        resolve_public(parsed)
    return parsed


def resolve_public(url: str) -> Target:
    """Resolve the URL's host; UrlRefused unless every address is public. The target
    connects to the first of them."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a label over 63 characters
        raise UrlRefused(f"callback_url: cannot resolve {host[:80]!r} ({exc})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        if not is_public(address):
            raise UrlRefused(f"callback_url: {host[:80]!r} resolves to {address}, which is "
                             "not a public address; the server does not call those back "
                             "(INFERQ_CALLBACK_ALLOW_PRIVATE=true allows it)")
    if not addresses:
        raise UrlRefused(f"callback_url: {host[:80]!r} has no address")
    pinned = addresses[0]
    netloc = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    if parts.port:
        netloc += f":{parts.port}"
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return Target(urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc.rpartition(
        "@")[2]}, extensions)
