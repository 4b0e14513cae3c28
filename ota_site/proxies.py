"""Which requests came through our own reverse proxy, and who the real client is.

nginx terminates TLS (and mTLS for devices) and forwards the client's address in
``X-Forwarded-For`` and a verified client certificate in ``X-SSL-Client-*`` headers. Anyone can
send those headers, so the app believes them only when the TCP peer (``REMOTE_ADDR``) is one of
``TRUSTED_PROXIES`` (addresses or networks, e.g. ``127.0.0.1,10.0.0.0/8``). With no trusted
proxies configured, forwarded headers are ignored everywhere.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def _networks(configured: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in configured)


def trusted_networks() -> tuple[Network, ...]:
    return _networks(tuple(settings.TRUSTED_PROXIES))


def _is_trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in network for network in trusted_networks())


def _meta(request: Any) -> dict[str, Any]:
    return request.META  # a Django HttpRequest or a DRF Request (which proxies META)


def from_trusted_proxy(request: Any) -> bool:
    """True when the TCP peer is a configured proxy, so its forwarded headers may be believed."""
    return _is_trusted(str(_meta(request).get("REMOTE_ADDR", "")))


def client_ip(request: Any) -> str:
    """The client's address: REMOTE_ADDR, or, behind trusted proxies, the nearest address in
    X-Forwarded-For that is not itself a trusted proxy (addresses further left are client-made
    and cannot be believed)."""
    meta = _meta(request)
    remote = str(meta.get("REMOTE_ADDR", "") or "")
    if not _is_trusted(remote):
        return remote
    forwarded = str(meta.get("HTTP_X_FORWARDED_FOR", "") or "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return remote  # a malformed chain: fall back to the proxy itself
        if not _is_trusted(hop):
            return hop
    return hops[0] if hops else remote


def forwarded_header(request: Any, name: str) -> str | None:
    """A header set by the proxy (``name`` as in META, e.g. HTTP_X_SSL_CLIENT_VERIFY), or None
    when the request did not come through a trusted proxy."""
    if not from_trusted_proxy(request):
        return None
    value = _meta(request).get(name)
    return str(value) if value is not None else None
