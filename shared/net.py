"""The client's address, trusting `X-Forwarded-For` only from configured proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """`127.0.0.1`, `10.0.0.0/8`, `::1` ... as networks; raise ValueError on a bad entry."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _trusted(address: str | None, proxies: tuple[Network, ...]) -> bool:
    if not address or not proxies:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(request: web.Request, trusted_proxies: tuple[Network, ...]) -> str:
    """The peer address, or, when the peer is a trusted proxy, the nearest untrusted X-Forwarded-For hop."""
    peer = request.remote or "unknown"
    if not _trusted(peer, trusted_proxies):
        return peer
    hops = [
        h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()
    ]
    for hop in reversed(hops):
        if not _trusted(hop, trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return hops[0] if hops else peer
