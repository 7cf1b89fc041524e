"""The development gateway in front of real upstream aiohttp servers on loopback ports."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from deploy.local.gateway import create_app, parse_args

AUTH = "/api/v1/auth"
REFERRAL = "/api/v1/referral"
MiB = 1024 * 1024

ServerFactory = Callable[..., Awaitable[TestServer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Upstream = Callable[..., Awaitable[str]]
Gateway = Callable[..., Awaitable[URL]]
Session = aiohttp.ClientSession


async def echo(request: web.Request) -> web.Response:
    """What the upstream received, as JSON (it does not echo X-Request-ID: the gateway must add it)."""
    body = await request.read()
    return web.json_response(
        {
            "upstream": request.app[NAME],
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body": body.decode("latin-1"),
        }
    )


NAME = web.AppKey("name", str)


def upstream_app(name: str, routes: Mapping[str, Handler]) -> web.Application:
    app = web.Application(client_max_size=16 * MiB)
    app[NAME] = name
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    if "/{tail:.*}" not in routes:
        app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> Upstream:
    """Start an upstream named `name` (handlers by path, echo elsewhere); return its origin URL."""

    async def start(name: str, routes: Mapping[str, Handler] | None = None) -> str:
        server = await aiohttp_server(upstream_app(name, routes or {}))
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no decompression, no added headers we could mistake for forwarded ones."""
    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent",)) as client:
        yield client


@pytest.fixture
def gateway(aiohttp_server: ServerFactory) -> Gateway:
    """Start the gateway with `routes`; return its base URL."""

    async def start(routes: Mapping[str, Sequence[str]], **options: Any) -> URL:
        server = await aiohttp_server(create_app(routes, **options))
        return server.make_url("")

    return start


def at(base: URL, target: str) -> URL:
    """`target` (path and query) on `base`, exactly as written."""
    return URL(str(base).rstrip("/") + target, encoded=True)


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]


async def assert_problem(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status
    assert body["code"] == code
    assert set(body) == {"type", "title", "status", "detail", "code"}
    assert response.headers.get("X-Request-ID")
    return body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_routes_by_longest_prefix(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    auth, referral, api = await upstream("auth"), await upstream("referral"), await upstream("api")
    base = await gateway({AUTH: [auth], REFERRAL: [referral], "/api": [api]})

    expected = {
        f"{AUTH}/token": "auth",
        AUTH: "auth",
        f"{AUTH}/": "auth",
        f"{REFERRAL}/codes/me": "referral",
        REFERRAL: "referral",
        f"{AUTH}x": "api",  # not under /api/v1/auth, but under /api
        "/api/v2/auth": "api",
        "/api": "api",
    }
    for path, name in expected.items():
        async with session.get(at(base, path)) as response:
            assert response.status == 200, path
            seen = await response.json()
            assert seen["upstream"] == name, path
            assert seen["raw_path"] == path


async def test_prefix_does_not_match_a_longer_segment(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    base = await gateway({AUTH: [await upstream("auth")]})
    for path in (f"{AUTH}x", f"{AUTH}x/token", "/api/v1/aut", "/api/v1", "/"):
        async with session.get(at(base, path)) as response:
            await assert_problem(response, 404, "not_found")


async def test_path_and_query_pass_unchanged(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    base = await gateway({AUTH: [await upstream("auth")]})
    target = f"{AUTH}/a%2Fb/c%20d/%7Euser/caf%C3%A9?q=1%202&x&a=b+c&=&&z=%2F%3F;k&email=J%40example.com"
    async with session.get(at(base, target)) as response:
        assert response.status == 200
        assert (await response.json())["raw_path"] == target


async def test_method_body_and_headers_are_forwarded(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    origin = await upstream("auth")
    base = await gateway({AUTH: [origin]})
    body = bytes(range(256)) * 4
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Authorization", "Bearer abc.def.ghi"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Cookie", "a=1"),
        ]
        async with session.request(method, at(base, f"{AUTH}/thing"), data=body, headers=headers) as response:
            assert response.status == 200, method
            seen = await response.json()
        assert seen["method"] == method
        assert seen["body"].encode("latin-1") == body
        assert header_values(seen, "X-Custom") == ["one", "two"]
        assert header_values(seen, "Authorization") == ["Bearer abc.def.ghi"]
        assert header_values(seen, "Content-Type") == ["application/octet-stream"]
        assert header_values(seen, "Cookie") == ["a=1"]
        assert header_values(seen, "Content-Length") == [str(len(body))]
        assert header_values(seen, "Host") == [URL(origin).raw_authority]
        assert header_values(seen, "User-Agent") == []  # nothing added that the client did not send


async def test_response_status_and_headers_come_back(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    async def created(request: web.Request) -> web.Response:
        response = web.Response(status=201, reason="Made It", text="{}", content_type="application/json")
        response.headers["Location"] = "/api/v1/auth/things/1"
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    base = await gateway(
        {AUTH: [await upstream("auth", {f"{AUTH}/created": created, f"{AUTH}/go": redirect})]}
    )
    async with session.post(at(base, f"{AUTH}/created")) as response:
        assert response.status == 201
        assert response.reason == "Made It"
        assert response.headers["Location"] == "/api/v1/auth/things/1"
        assert len(response.headers.getall("Set-Cookie")) == 2
    async with session.get(at(base, f"{AUTH}/go"), allow_redirects=False) as response:
        assert response.status == 302  # passed back, not followed by the gateway
        assert response.headers["Location"] == "/elsewhere"


async def test_round_robin_across_upstreams(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    first, second = await upstream("first"), await upstream("second")
    base = await gateway({AUTH: [first, second]})
    seen = []
    for _ in range(6):
        async with session.get(at(base, f"{AUTH}/x")) as response:
            seen.append((await response.json())["upstream"])
    assert set(seen) == {"first", "second"}
    assert all(a != b for a, b in itertools.pairwise(seen)), seen  # strictly alternating


async def test_an_unreachable_upstream_is_skipped(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    alive = await upstream("alive")
    base = await gateway({AUTH: [f"http://127.0.0.1:{free_port()}", alive]})
    for _ in range(4):
        async with session.post(at(base, f"{AUTH}/x"), data=b"payload") as response:
            assert response.status == 200
            seen = await response.json()
            assert seen["upstream"] == "alive"
            assert seen["body"] == "payload"


@pytest.mark.parametrize(
    "target",
    [
        "/internal",
        "/internal/",
        "/internal/v1/codes/ABC",
        "/internal/v1/referrals?x=1",
        "/%69nternal/v1/codes/ABC",
        "/internal%2Fv1/codes/ABC",
        f"{AUTH}/../../../internal/v1/codes/ABC",
        f"{AUTH}/%2e%2e/%2e%2e/%2e%2e/internal/v1/codes/ABC",
        f"{AUTH}/./token",
    ],
)
async def test_internal_paths_are_never_exposed(
    upstream: Upstream, gateway: Gateway, session: Session, target: str
) -> None:
    calls: list[str] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(request.raw_path)
        return web.Response(text="should not be reached")

    origin = await upstream("everything", {"/{tail:.*}": record})
    base = await gateway({"/": [origin], AUTH: [origin]})
    async with session.post(at(base, target), json={}) as response:
        await assert_problem(response, 404, "not_found")
    assert calls == []
    async with session.get(at(base, "/internalx")) as response:  # only the /internal segment is special
        assert response.status == 200
    assert calls == ["/internalx"]


async def test_unknown_path_is_404_problem(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    base = await gateway({AUTH: [await upstream("auth")]})
    for target in ("/nothing/here", "/api/v1/referral/codes", "/favicon.ico"):
        async with session.get(at(base, target)) as response:
            body = await assert_problem(response, 404, "not_found")
            assert body["type"].endswith("not_found")


async def test_healthz_is_the_gateways_own(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    calls: list[str] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(text="upstream")

    base = await gateway({"/": [await upstream("root", {"/healthz": record})]})
    async with session.get(at(base, "/healthz")) as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
        assert response.headers["X-Request-ID"]
    assert calls == []


async def test_upstream_down_is_502(gateway: Gateway, session: Session) -> None:
    base = await gateway({AUTH: [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]})
    async with session.get(at(base, f"{AUTH}/token"), headers={"X-Request-ID": "down-1"}) as response:
        await assert_problem(response, 502, "bad_gateway")
        assert response.headers["X-Request-ID"] == "down-1"


async def test_slow_upstream_is_504(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/slow": slow})]}, timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        async with session.get(at(base, f"{AUTH}/slow")) as response:
            await assert_problem(response, 504, "gateway_timeout")
        assert asyncio.get_running_loop().time() - started < 3
        async with session.get(at(base, f"{AUTH}/fast")) as response:  # the gateway is still fine
            assert response.status == 200
    finally:
        release.set()


async def test_body_over_the_limit_is_413(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    base = await gateway({AUTH: [await upstream("auth")]}, max_body=1000)
    async with session.post(at(base, f"{AUTH}/x"), data=b"a" * 1000) as response:
        assert response.status == 200
        assert len((await response.json())["body"]) == 1000
    async with session.post(at(base, f"{AUTH}/x"), data=b"a" * 1001) as response:
        await assert_problem(response, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to judge by
        for _ in range(5):
            yield b"b" * 300

    async with session.post(at(base, f"{AUTH}/x"), data=chunks()) as response:
        await assert_problem(response, 413, "payload_too_large")


async def test_default_body_limit_is_one_mebibyte(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    base = await gateway({AUTH: [await upstream("auth")]})
    async with session.put(at(base, f"{AUTH}/x"), data=io.BytesIO(b"a" * MiB)) as response:
        assert response.status == 200
        assert len((await response.json())["body"]) == MiB
    async with session.put(at(base, f"{AUTH}/x"), data=io.BytesIO(b"a" * (MiB + 1))) as response:
        await assert_problem(response, 413, "payload_too_large")


async def test_a_larger_limit_passes_larger_bodies(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    base = await gateway({AUTH: [await upstream("auth")]}, max_body=4 * MiB)
    body = os.urandom(3 * MiB)
    async with session.post(at(base, f"{AUTH}/x"), data=io.BytesIO(body)) as response:
        assert response.status == 200
        assert (await response.json())["body"].encode("latin-1") == body


async def test_request_id_is_kept_or_generated(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    base = await gateway({AUTH: [await upstream("auth")]})

    async with session.get(at(base, f"{AUTH}/x"), headers={"X-Request-ID": "abc.DEF_1:2-3"}) as response:
        seen = await response.json()
        assert response.headers["X-Request-ID"] == "abc.DEF_1:2-3"
        assert header_values(seen, "X-Request-ID") == ["abc.DEF_1:2-3"]

    for bad in (None, "", "has space", "x" * 129, "semi;colon", "ünï"):
        headers = {} if bad is None else {"X-Request-ID": bad}
        async with session.get(at(base, f"{AUTH}/x"), headers=headers) as response:
            seen = await response.json()
            generated = response.headers["X-Request-ID"]
            assert len(generated) == 32
            assert int(generated, 16) >= 0
            assert generated != bad
            assert header_values(seen, "X-Request-ID") == [generated]

    async with session.get(at(base, "/unknown"), headers={"X-Request-ID": "err-42"}) as response:
        assert response.headers["X-Request-ID"] == "err-42"


async def test_the_upstreams_request_id_is_kept(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    async def echoes(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Request-ID": request.headers["X-Request-ID"] + "-seen"})

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/echoes": echoes})]})
    async with session.get(at(base, f"{AUTH}/echoes"), headers={"X-Request-ID": "mine"}) as response:
        assert response.headers.getall("X-Request-ID") == ["mine-seen"]


async def test_forwarded_headers(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    base = await gateway({AUTH: [await upstream("auth")]})
    async with session.get(at(base, f"{AUTH}/x")) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]

    headers = [
        ("X-Forwarded-For", "203.0.113.7, 198.51.100.1"),
        ("X-Forwarded-For", "192.0.2.9"),
        ("X-Forwarded-Proto", "https"),
    ]
    async with session.get(at(base, f"{AUTH}/x"), headers=headers) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]  # the peer only: the chain is dropped
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]


async def test_hop_by_hop_headers_are_not_forwarded(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    async def hoppy(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.update(
            {
                "Keep-Alive": "timeout=99",
                "Proxy-Authenticate": "Basic",
                "Upgrade": "h2c",
                "Trailer": "X-Checksum",
                "X-Named-In-Connection": "drop",
                "Connection": "X-Named-In-Connection",
                "X-End-To-End": "keep",
            }
        )
        return response

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/hoppy": hoppy})]})
    sent = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Proxy-Authorization": "Basic eDp5",
        "Proxy-Connection": "keep-alive",
        "X-Kept": "yes",
    }
    async with session.get(at(base, f"{AUTH}/x"), headers=sent) as response:
        seen = await response.json()
    names = {name.lower() for name, _ in seen["headers"]}
    for dropped in ("x-drop-me", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"):
        assert dropped not in names, dropped
    assert header_values(seen, "Connection") in ([], ["keep-alive"])  # the gateway's own connection, if any
    assert header_values(seen, "X-Kept") == ["yes"]

    async with session.get(at(base, f"{AUTH}/hoppy")) as response:
        assert response.status == 200
        for dropped in ("Keep-Alive", "Proxy-Authenticate", "Upgrade", "Trailer", "X-Named-In-Connection"):
            assert dropped not in response.headers, dropped
        assert response.headers["X-End-To-End"] == "keep"


async def test_large_streamed_response_arrives_intact(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    payload = os.urandom(6 * MiB + 123)
    first_chunk_relayed = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        await response.write(payload[:65536])
        # The rest only once the client has the first chunk: a gateway that buffers never gets there.
        await asyncio.wait_for(first_chunk_relayed.wait(), 10)
        view = memoryview(payload)
        for start in range(65536, len(payload), 256 * 1024):
            await response.write(view[start : start + 256 * 1024])
        await response.write_eof()
        return response

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/stream": stream, f"{AUTH}/sized": sized})]})
    async with session.get(at(base, f"{AUTH}/stream")) as response:
        assert response.status == 200
        first = await asyncio.wait_for(response.content.readexactly(65536), 10)
        first_chunk_relayed.set()
        rest = await response.read()
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(payload).digest()

    async with session.get(at(base, f"{AUTH}/sized")) as response:
        assert response.headers["Content-Length"] == str(len(payload))
        assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(payload).digest()


async def test_encoded_bodies_pass_untouched(upstream: Upstream, gateway: Gateway, session: Session) -> None:
    compressed = gzip.compress(b'{"hello": "world"}' * 1000)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/gz": gzipped})]})
    async with session.get(at(base, f"{AUTH}/gz"), headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(compressed))
        assert await response.read() == compressed


async def test_head_is_forwarded_without_a_body(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000, headers={"X-Method": request.method})

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/sized": sized})]})
    for _ in range(2):  # and the connection stays usable
        async with session.head(at(base, f"{AUTH}/sized")) as response:
            assert response.status == 200
            assert response.headers["X-Method"] == "HEAD"
            assert response.headers["Content-Length"] == "5000"
            assert await response.read() == b""
    async with session.get(at(base, f"{AUTH}/sized")) as response:
        assert len(await response.read()) == 5000


async def test_an_upstream_breaking_off_midway_breaks_the_client_response(
    upstream: Upstream, gateway: Gateway, session: Session
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return response

    base = await gateway({AUTH: [await upstream("auth", {f"{AUTH}/broken": broken})]})
    async with session.get(at(base, f"{AUTH}/broken")) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with session.get(at(base, f"{AUTH}/fine")) as response:
        assert response.status == 200


def test_command_line() -> None:
    args = parse_args(
        [
            "--port",
            "9090",
            "--route",
            f"{AUTH}=http://127.0.0.1:8081,http://127.0.0.1:8083",
            "--route",
            f"{REFERRAL}=http://127.0.0.1:8082",
            "--timeout",
            "2.5",
            "--max-body",
            "2048",
        ]
    )
    assert args.host == "127.0.0.1"
    assert args.port == 9090
    assert args.routes == {
        AUTH: ["http://127.0.0.1:8081", "http://127.0.0.1:8083"],
        REFERRAL: ["http://127.0.0.1:8082"],
    }
    assert args.timeout == 2.5
    assert args.max_body == 2048
    defaults = parse_args(["--route", "/=http://127.0.0.1:1"])
    assert (defaults.port, defaults.timeout, defaults.max_body) == (8080, 30.0, MiB)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--route", "/api"],
        ["--route", "/api="],
        ["--route", "/a=http://127.0.0.1:1", "--route", "/a=http://127.0.0.1:2"],
    ],
)
def test_command_line_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "route" in capsys.readouterr().err


@pytest.mark.parametrize(
    "routes",
    [
        {"api": ["http://127.0.0.1:1"]},
        {"/api": []},
        {"/api": ["ftp://127.0.0.1:1"]},
        {"/api": ["http://127.0.0.1:1/prefix"]},
        {"/api": ["http://user:secret@127.0.0.1:1"]},
        {"/api": ["127.0.0.1:1"]},
    ],
)
def test_bad_routes_are_refused(routes: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError, match=r"route|upstream"):
        create_app(routes)
