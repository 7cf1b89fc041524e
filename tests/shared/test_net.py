"""shared.net.client_address: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from shared.net import client_address, parse_networks

PROXIES = parse_networks(["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8"])


def request_from(peer: str, *forwarded: str) -> web.Request:
    headers = CIMultiDict[str]()
    for value in forwarded:
        headers.add("X-Forwarded-For", value)
    return make_mocked_request("GET", "/", headers=headers).clone(remote=peer)


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # An untrusted peer: its own address, whatever it claims.
        ("203.0.113.9", ["198.51.100.7"], "203.0.113.9"),
        ("203.0.113.9", ["10.0.0.1"], "203.0.113.9"),
        ("203.0.113.9", [], "203.0.113.9"),
        ("2001:db8::9", ["198.51.100.7"], "2001:db8::9"),
        # A trusted proxy: the right-most hop that is not a trusted proxy.
        ("10.0.0.5", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.5", ["198.51.100.7, 10.0.0.3"], "198.51.100.7"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.7, 10.9.9.9, 10.0.0.3"], "198.51.100.7"),
        ("10.0.0.5", ["6.6.6.6", "198.51.100.7, 10.0.0.3"], "198.51.100.7"),
        ("127.0.0.1", [" 198.51.100.7 ,  10.0.0.3 "], "198.51.100.7"),
        ("::1", ["2001:db8::1"], "2001:db8::1"),
        ("::1", ["2001:DB8:0:0::1, fd00::2"], "2001:db8::1"),
        ("10.0.0.5", [",, 198.51.100.7 ,,"], "198.51.100.7"),
        # Every hop trusted: the left-most one.
        ("10.0.0.5", ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
        ("127.0.0.1", ["::1, 10.2.2.2"], "::1"),
        # A trusted peer that forwards nothing: the peer.
        ("10.0.0.5", [], "10.0.0.5"),
        ("10.0.0.5", [""], "10.0.0.5"),
        # Garbage where the client address should be: the peer, never the garbage.
        ("10.0.0.5", ["not-an-ip"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.7, garbage"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.7:443"], "10.0.0.5"),
        ("10.0.0.5", ["<script>alert(1)</script>"], "10.0.0.5"),
        ("10.0.0.5", ["1.2.3.4.5"], "10.0.0.5"),
        ("10.0.0.5", ["999.1.1.1"], "10.0.0.5"),
        ("10.0.0.5", ["unknown, 10.0.0.3"], "10.0.0.5"),
    ],
)
def test_client_address(peer, forwarded, expected):
    assert client_address(request_from(peer, *forwarded), PROXIES) == expected


def test_without_trusted_proxies_the_peer_is_the_client():
    assert client_address(request_from("10.0.0.5", "198.51.100.7"), ()) == "10.0.0.5"


def test_parse_networks():
    networks = parse_networks([" 10.0.0.0/8 ", "", "192.168.1.1", "::1", "10.1.2.3/8"])
    assert [str(n) for n in networks] == ["10.0.0.0/8", "192.168.1.1/32", "::1/128", "10.0.0.0/8"]
    with pytest.raises(ValueError, match="not-a-network"):
        parse_networks(["not-a-network"])


async def test_over_a_real_connection(aiohttp_client: Any):
    """The peer of a loopback connection is 127.0.0.1: trusted here, untrusted when unlisted."""

    async def handler(request: web.Request) -> web.Response:
        trusted = parse_networks(request.query.getall("trust", []))
        return web.Response(text=client_address(request, trusted))

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    forwarded = {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}
    trusted = await client.get("/", params={"trust": "127.0.0.1"}, headers=forwarded)
    assert await trusted.text() == "198.51.100.7"
    untrusted = await client.get("/", params={"trust": "10.0.0.0/8"}, headers=forwarded)
    assert await untrusted.text() == "127.0.0.1"
    plain = await client.get("/", params={"trust": "127.0.0.1"})
    assert await plain.text() == "127.0.0.1"
