"""Callback URLs a tenant may give: http(s) only, and by default no address inside the
deployment (loopback, private, link-local, multicast, reserved), checked when the job is
submitted and again before each delivery (a name may resolve elsewhere later)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

_URL = TypeAdapter(AnyHttpUrl)


class UrlRefused(ValueError):
    pass


def check_callback_url(url: str, allow_private: bool) -> str:
    """The URL, normalised; UrlRefused saying why it cannot be called back."""
    try:
        parsed = str(_URL.validate_python(url))
    except ValidationError as exc:
        raise UrlRefused(f"callback_url: {exc.errors()[0]['msg']}") from None
    if not allow_private:
        refuse_internal(parsed)
    return parsed


def refuse_internal(url: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https"
                                                        else 80), proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise UrlRefused(f"callback_url: cannot resolve {host!r} ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if (address.is_private or address.is_loopback or address.is_link_local
                or address.is_multicast or address.is_reserved or address.is_unspecified):
            raise UrlRefused(f"callback_url: {host!r} resolves to {address}, an internal "
                             "address; the server does not call those back "
                             "(INFERQ_CALLBACK_ALLOW_PRIVATE=true allows it)")
