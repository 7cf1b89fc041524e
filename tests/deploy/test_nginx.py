"""The nginx gateway (deploy/nginx): real nginx, rendered by deploy.nginx.render, in front of real
upstream aiohttp servers that record what they receive. nginx must be installed: these tests fail
(they do not skip) without it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from deploy.local.processes import (
    AddressInUse,
    Process,
    free_port,
    http_status,
    launch,
    start_fresh,
    stop_all,
)
from deploy.nginx.render import (
    API_CSP,
    COMPOSE,
    COMPOSE_CONF,
    DOCS_PREFIXES,
    K8S,
    K8S_CONF,
    GatewayConfig,
    NginxConfigError,
    check_config,
    csp_hash,
    docs_csp,
    nginx_command,
    render,
    write_runtime,
)
from services.auth.settings import AuthSettings
from services.referral.settings import ReferralSettings

AUTH = "/api/v1/auth"
REFERRAL = "/api/v1/referral"
INSTALL_HINT = (
    "nginx is not installed (or not on PATH): these tests run the real gateway. "
    "Install it: `apt-get install nginx-light` (Debian/Ubuntu), `brew install nginx` (macOS); "
    "the CI workflow installs it when missing."
)

ServerFactory = Callable[..., Awaitable[TestServer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NAME = web.AppKey("name", str)
CALLS = web.AppKey("calls", list)


@pytest.fixture(autouse=True, scope="module")
def nginx_installed() -> None:
    if shutil.which("nginx") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)


def dead_upstream() -> str:
    """host:port where nothing listens."""
    return f"127.0.0.1:{free_port()}"


async def echo(request: web.Request) -> web.Response:
    """What the upstream received, as JSON (it does not echo X-Request-ID: the gateway must add it)."""
    body = await request.read()
    request.app[CALLS].append(request.raw_path)
    return web.json_response(
        {
            "upstream": request.app[NAME],
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body": body.decode("latin-1"),
        }
    )


class Upstream:
    """A running upstream test server: its `host:port`, the raw paths it was asked for, its connections."""

    def __init__(self, server: TestServer, app: web.Application) -> None:
        self.address = f"127.0.0.1:{server.port}"
        self.calls: list[str] = app[CALLS]
        self._server = server

    @property
    def open_connections(self) -> int:
        assert self._server.runner is not None and self._server.runner.server is not None
        return len(self._server.runner.server.connections)


Upstreams = Callable[..., Awaitable[Upstream]]


@pytest.fixture
def upstream(aiohttp_server: ServerFactory) -> Upstreams:
    """Start an upstream named `name` (handlers by path, echo elsewhere)."""

    async def start(name: str, routes: Mapping[str, Handler] | None = None) -> Upstream:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app[NAME] = name
        app[CALLS] = []
        for path, handler in (routes or {}).items():
            app.router.add_route("*", path, handler)
        app.router.add_route("*", "/{tail:.*}", echo)
        server = await aiohttp_server(app)
        return Upstream(server, app)

    return start


def _group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


Gateway = Callable[..., Awaitable[URL]]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """Start real nginx for `GatewayConfig(**options)` (deploy/local/processes.py, as `make run` and the
    e2e harness do); return its base URL.

    Its port is picked, then bound; when something took it meanwhile, it starts again on a fresh one.
    Each nginx runs in its own process group; at the end it gets SIGTERM, and no process of that
    group (master or worker) may be left.
    """
    started: list[Process] = []

    async def start(auth: list[str], referral: list[str] | None = None, **options: Any) -> URL:
        def attempt(into: list[Process]) -> Process:
            port = free_port()
            config = GatewayConfig(
                auth_upstreams=tuple(auth),
                referral_upstreams=tuple(referral or [dead_upstream()]),
                listen=f"127.0.0.1:{port}",
                **options,
            )
            runtime = tmp_path / f"nginx-{len(started)}"
            conf = write_runtime(config, runtime)
            check_config(conf)
            process = Process("nginx", nginx_command(conf), dict(os.environ), port=port, log_dir=runtime)
            launch(into, [process], time.monotonic() + 10)
            return process

        process, _ = start_fresh(attempt)
        started.append(process)
        return URL(process.url)

    yield start
    for process in started:
        assert process.stop(10) == 0, process.log_tail()
        assert process.problems == []
        assert _group_members(process.pid) == [], "nginx processes left behind"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no decompression, no added headers we could mistake for forwarded ones."""
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding")
    ) as client:
        yield client


Session = aiohttp.ClientSession


def at(base: URL, target: str) -> URL:
    """`target` (path and query) on `base`, exactly as written."""
    return URL(str(base).rstrip("/") + target, encoded=True)


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]


async def assert_problem(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The gateway's own problem+json answer, with its headers."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = json.loads(await response.read())
    assert body == {
        "type": f"urn:referral-system:problem:{code}",
        "title": body["title"],
        "status": status,
        "detail": body["detail"],
        "code": code,
    }
    assert body["title"]
    assert body["detail"]
    assert_gateway_headers(response)
    return body


def assert_gateway_headers(response: aiohttp.ClientResponse) -> None:
    assert response.headers.getall("X-Request-ID")
    assert response.headers.getall("X-Content-Type-Options") == ["nosniff"]
    assert response.headers.getall("Referrer-Policy") == ["no-referrer"]
    assert len(response.headers.getall("Content-Security-Policy")) == 1
    assert "/" not in response.headers.get("Server", "")  # no version


# The configuration files.


def test_the_compose_configuration_is_the_rendered_one() -> None:
    expected = GatewayConfig(
        auth_upstreams=("auth:8081",), referral_upstreams=("referral:8082",), listen="0.0.0.0:8080"
    )
    assert expected == COMPOSE
    text = COMPOSE_CONF.read_text(encoding="utf-8")
    assert text == render(COMPOSE), "run `python -m deploy.nginx.render` after changing the template"
    for line in (
        "listen 0.0.0.0:8080;",
        "server auth:8081 max_fails=1 fail_timeout=3s;",
        "server referral:8082 max_fails=1 fail_timeout=3s;",
        "keepalive_timeout 3s;",
        "pid /tmp/nginx.pid;",
        "error_log /dev/stderr warn;",
        "access_log /dev/stdout gateway;",
        "client_body_temp_path /tmp/client_body;",
    ):
        assert line in text
    assert "user " not in text.split("events")[0]
    assert text.count("location /internal/") == 1, "no service-to-service listener unless asked for"
    assert "real_ip" not in text, "compose publishes the gateway: it is the edge, no proxy is trusted"


def test_the_kubernetes_configuration_is_the_rendered_one() -> None:
    """The Ingress controller is in front of the Kubernetes gateway: its X-Forwarded-For is believed."""
    private = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
    assert dataclasses.replace(COMPOSE, trusted_proxies=private) == K8S
    text = K8S_CONF.read_text(encoding="utf-8")
    assert text == render(K8S), "run `python -m deploy.nginx.render` after changing the template"
    realip = [line.strip() for line in text.splitlines() if "real_ip" in line and "#" not in line]
    assert realip == [
        "set_real_ip_from 10.0.0.0/8;",
        "set_real_ip_from 172.16.0.0/12;",
        "set_real_ip_from 192.168.0.0/16;",
        "real_ip_header X-Forwarded-For;",
        "real_ip_recursive on;",
    ]
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text  # the client alone, never the chain


@pytest.mark.parametrize("committed", [COMPOSE_CONF, K8S_CONF], ids=["compose", "k8s"])
def test_nginx_accepts_the_local_and_the_committed_configurations(tmp_path: Path, committed: Path) -> None:
    local = GatewayConfig(
        auth_upstreams=("127.0.0.1:8081",), referral_upstreams=("127.0.0.1:8082",), trusted_proxies=("::1",)
    )
    check_config(write_runtime(local, tmp_path / "local"))
    # The compose names resolve only inside compose's network (nginx resolves them at start), the
    # Kubernetes ones inside the cluster: the same file with them pointed at loopback.
    text = committed.read_text(encoding="utf-8")
    assert text.count("server auth:8081 ") == 1
    assert text.count("server referral:8082 ") == 1
    text = text.replace("server auth:8081 ", "server 127.0.0.1:8081 ")
    text = text.replace("server referral:8082 ", "server 127.0.0.1:8082 ")
    path = tmp_path / "committed" / "nginx.conf"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    check_config(path)


def test_a_burst_of_zero_is_no_burst(tmp_path: Path) -> None:
    config = GatewayConfig(
        auth_upstreams=("127.0.0.1:1",),
        referral_upstreams=("127.0.0.1:2",),
        token_burst=0,
        lookup_burst=0,
        signin_burst=0,
    )
    conf = write_runtime(config, tmp_path)
    check_config(conf)  # nginx itself refuses `burst=0`
    text = conf.read_text()
    assert "limit_req zone=token nodelay;" in text
    assert "limit_req zone=signup burst=10 nodelay;" in text
    assert "limit_req zone=lookup nodelay;" in text
    assert "limit_req zone=signin nodelay;" in text
    assert text.count("limit_req zone=mail burst=5 nodelay;") == 2


def test_check_config_raises_with_nginx_s_message(tmp_path: Path) -> None:
    conf = write_runtime(GatewayConfig(auth_upstreams=("a:1",), referral_upstreams=("b:2",)), tmp_path)
    conf.write_text(conf.read_text().replace("server_tokens off;", "server_tokens maybe;"))
    with pytest.raises(NginxConfigError, match='invalid value "maybe"'):
        check_config(conf)


def test_write_runtime_and_the_command(tmp_path: Path) -> None:
    config = GatewayConfig(auth_upstreams=("127.0.0.1:1",), referral_upstreams=("127.0.0.1:2", "[::1]:3"))
    conf = write_runtime(config, tmp_path / "gw")
    assert conf == (tmp_path / "gw" / "nginx.conf").resolve()
    assert conf.read_text() == render(config, runtime_dir=str(conf.parent))
    assert {path.name for path in (conf.parent / "temp").iterdir()} == {
        "client_body",
        "proxy",
        "fastcgi",
        "uwsgi",
        "scgi",
    }
    assert nginx_command(conf) == [
        "nginx",
        "-e",
        "stderr",
        "-p",
        str(conf.parent),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]
    text = conf.read_text()
    assert f"pid {conf.parent}/nginx.pid;" in text
    assert f"proxy_temp_path {conf.parent}/temp/proxy;" in text
    assert "server [::1]:3 max_fails=1 fail_timeout=3s;" in text


def test_retry_after_follows_the_rates() -> None:
    config = GatewayConfig(
        auth_upstreams=("a:1",),
        referral_upstreams=("b:2",),
        token_rate="1r/m",
        signup_rate="30r/m",
        lookup_rate="3r/s",
        signin_rate="4r/m",
        mail_rate="7r/m",
    )
    text = render(config)
    assert "/api/v1/auth/token 60;" in text
    assert "/api/v1/auth/signup 2;" in text
    assert "/api/v1/referral/codes 1;" in text
    assert '"~^/api/v1/auth/oauth/[^/]+/authorize$" 15;' in text
    assert "/api/v1/auth/password/forgot 9;" in text
    assert "/api/v1/auth/email/verification 9;" in text


def test_trusted_proxies_are_addresses_or_networks() -> None:
    proxies = ("10.0.0.0/8", "127.0.0.1", "::1", "2001:db8::/32", "0.0.0.0/0")
    text = render(
        GatewayConfig(auth_upstreams=("a:1",), referral_upstreams=("b:2",), trusted_proxies=proxies)
    )
    for proxy in proxies:
        assert f"    set_real_ip_from {proxy};\n" in text
    assert text.count("real_ip_header X-Forwarded-For;") == 1


@pytest.mark.parametrize(
    "change",
    [
        {"auth_upstreams": ()},
        {"auth_upstreams": "127.0.0.1:1"},
        {"auth_upstreams": ("127.0.0.1",)},
        {"referral_upstreams": ("b:2; include /etc/passwd",)},
        {"listen": "8080; evil"},
        {"max_body": "lots"},
        {"token_rate": "10r/h"},
        {"signup_burst": -1},
        {"signin_rate": "1r/h"},
        {"mail_burst": -1},
        {"trusted_proxies": "10.0.0.0/8"},
        {"trusted_proxies": ["10.0.0.0/8"]},
        {"trusted_proxies": ("",)},
        {"trusted_proxies": ("proxy.example.com",)},
        {"trusted_proxies": ("10.0.0.1/8",)},
        {"trusted_proxies": ("10.0.0.0/33",)},
        {"trusted_proxies": ("fe80::1%eth0",)},
        {"trusted_proxies": ("10.0.0.0/8; include /etc/passwd",)},
        {"trusted_proxies": ("10.0.0.0/8", 7)},
        {"proxy_timeout": 0},
        {"upstream_keepalive_timeout": 0},
        {"upstream_fail_timeout": 1.5},
        {"internal_listen": "9000; include /etc/passwd"},
        {"access_log": "/tmp/a log"},
        {"error_log": "relative.log"},
    ],
)
def test_bad_configurations_are_refused(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"auth_upstreams": ("a:1",), "referral_upstreams": ("b:2",), **change}
    with pytest.raises(ValueError, match=r"\w"):
        GatewayConfig(**fields)


# Real nginx in front of real upstreams.


async def test_routes_by_prefix_with_path_and_query_unchanged(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    auth, referral = await upstream("auth"), await upstream("referral")
    base = await gateway([auth.address], [referral.address])
    cases = [
        (AUTH, "auth"),
        (f"{AUTH}/", "auth"),
        (f"{AUTH}/me", "auth"),
        (f"{AUTH}/.well-known/jwks.json", "auth"),
        (f"{AUTH}/oauth/x/callback?code=a%2Fb&state=%C3%A9+c&empty=&flag", "auth"),
        (f"{AUTH}//double//slashes", "auth"),
        (f"{AUTH}/a..b/...x/.hidden", "auth"),  # dots, but no dot segment
        (REFERRAL, "referral"),
        (f"{REFERRAL}/codes/me", "referral"),
        (f"{REFERRAL}/referrers/x/referrals?limit=5&cursor=a%2Bb%3D", "referral"),
        (f"{REFERRAL}/pct%20encoded%2Fslash", "referral"),
    ]
    for target, name in cases:
        async with session.get(at(base, target)) as response:
            assert response.status == 200, target
            seen = await response.json()
        assert (seen["upstream"], seen["method"], seen["raw_path"]) == (name, "GET", target)

    async with session.post(
        at(base, f"{REFERRAL}/referrals?x=1"), data=b'{"code": "ABC"}', headers={"Content-Type": "x/y"}
    ) as response:
        seen = await response.json()
    assert (seen["upstream"], seen["method"], seen["body"]) == ("referral", "POST", '{"code": "ABC"}')
    assert header_values(seen, "Content-Type") == ["x/y"]


async def test_round_robin_and_failover(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    first, second = await upstream("first"), await upstream("second")
    base = await gateway([first.address, second.address])
    names = set()
    for _ in range(6):
        async with session.get(at(base, f"{AUTH}/x")) as response:
            names.add((await response.json())["upstream"])
    assert names == {"first", "second"}

    # The first instance is down: every request is answered by the second one.
    base = await gateway([dead_upstream(), second.address])
    for _ in range(6):
        async with session.get(at(base, f"{AUTH}/x"), headers={"X-Request-ID": "failover"}) as response:
            assert response.status == 200
            assert (await response.json())["upstream"] == "second"
            assert response.headers["X-Request-ID"] == "failover"
    # Nothing was sent to the stopped one, so even a POST may go on to the next.
    async with session.post(at(base, f"{AUTH}/x"), data=b"{}") as response:
        assert response.status == 200
        assert (await response.json())["upstream"] == "second"


async def test_a_post_is_not_retried_once_sent(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    hits: list[str] = []

    async def hang_up(request: web.Request) -> web.Response:
        hits.append(request.method)
        assert request.transport is not None
        request.transport.close()  # the request arrived; the answer never comes
        return web.Response()

    first = await upstream("first", {f"{AUTH}/once": hang_up})
    second = await upstream("second", {f"{AUTH}/once": hang_up})
    base = await gateway([first.address, second.address])
    async with session.post(at(base, f"{AUTH}/once"), data=b"{}") as response:
        await assert_problem(response, 502, "bad_gateway")
    assert hits == ["POST"]
    # A GET is tried on the other instance too (a fresh gateway: the first one now counts both down).
    hits.clear()
    base = await gateway([first.address, second.address])
    async with session.get(at(base, f"{AUTH}/once")) as response:
        await assert_problem(response, 502, "bad_gateway")
    assert hits == ["GET", "GET"]


KEYED_WRITES = [f"{AUTH}/signup", f"{REFERRAL}/codes", f"{REFERRAL}/referrals"]


def _keyed_gateway_args(path: str, first: Upstream, second: Upstream) -> tuple[list[str], list[str]]:
    """(auth, referral) upstreams: the two instances on the side `path` belongs to."""
    pair = [first.address, second.address]
    return (pair, [dead_upstream()]) if path.startswith(AUTH) else ([dead_upstream()], pair)


@pytest.mark.parametrize("path", KEYED_WRITES)
async def test_a_post_with_an_idempotency_key_is_retried_on_another_instance_once_sent(
    upstream: Upstreams, gateway: Gateway, session: Session, path: str
) -> None:
    hits: list[str] = []

    async def hang_up(request: web.Request) -> web.Response:
        hits.append(request.app[NAME])
        assert request.transport is not None
        request.transport.close()  # the request arrived; the answer never comes
        return web.Response()

    first = await upstream("first", {path: hang_up})
    second = await upstream("second", {path: hang_up})
    base = await gateway(*_keyed_gateway_args(path, first, second))
    keyed = {"Idempotency-Key": "k-1", "Content-Type": "application/json"}
    async with session.post(at(base, path), data=b'{"a": 1}', headers=keyed) as response:
        await assert_problem(response, 502, "bad_gateway")  # the gateway's problem pages still apply
        assert_gateway_headers(response)
    assert sorted(hits) == ["first", "second"]
    # Without the key, the same POST stays on the instance that may have started it.
    hits.clear()
    base = await gateway(*_keyed_gateway_args(path, first, second))
    async with session.post(at(base, path), data=b'{"a": 1}') as response:
        await assert_problem(response, 502, "bad_gateway")
    assert len(hits) == 1

    # The other instance answers: the request arrives there whole (path, body, the key).
    healthy = await upstream("healthy")
    base = await gateway(*_keyed_gateway_args(path, first, healthy))
    for _ in range(2):  # whichever instance comes first in the rotation
        async with session.post(at(base, path + "?q=1"), data=b'{"a": 1}', headers=keyed) as response:
            assert response.status == 200
            seen = await response.json()
        assert seen["upstream"] == "healthy"
        assert (seen["method"], seen["raw_path"], seen["body"]) == ("POST", path + "?q=1", '{"a": 1}')
        assert header_values(seen, "Idempotency-Key") == ["k-1"]


async def test_only_the_keyed_writes_are_retried_once_sent(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    hits: list[str] = []

    async def hang_up(request: web.Request) -> web.Response:
        hits.append(request.method)
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    for path in (f"{AUTH}/token", f"{AUTH}/password/change", f"{REFERRAL}/codes/me"):
        first = await upstream("first", {path: hang_up})
        second = await upstream("second", {path: hang_up})
        hits.clear()
        base = await gateway(*_keyed_gateway_args(path, first, second))
        async with session.post(at(base, path), data=b"{}", headers={"Idempotency-Key": "k-1"}) as response:
            await assert_problem(response, 502, "bad_gateway")
        assert hits == ["POST"], path


async def test_idle_upstream_connections_are_closed_by_nginx_after_its_keepalive_timeout(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    """What a stopping service counts on (shared/serving.py): nginx closes an idle upstream connection
    itself, so the service never has to close one nginx may be sending a request on."""
    first = await upstream("first")
    base = await gateway([first.address], upstream_keepalive_timeout=1)
    async with session.get(at(base, f"{AUTH}/x")) as response:
        assert response.status == 200
    assert first.open_connections == 1  # kept for the next request
    idle_since = time.monotonic()
    while first.open_connections and time.monotonic() - idle_since < 5:
        await asyncio.sleep(0.05)
    assert first.open_connections == 0
    assert 0.8 < time.monotonic() - idle_since < 3


def test_nginx_closes_idle_upstream_connections_before_a_stopping_service_would() -> None:
    gateway = GatewayConfig(auth_upstreams=("a:1",), referral_upstreams=("b:2",))
    for settings in (AuthSettings, ReferralSettings):
        drain = next(f.default for f in dataclasses.fields(settings) if f.name == "shutdown_drain")
        assert isinstance(drain, float)
        # A second of margin: nginx's timer and the service's drain start at about the same moment.
        assert gateway.upstream_keepalive_timeout + 1 <= drain, settings


async def test_the_internal_listener_passes_only_internal_paths_to_the_referral_instances(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    first, second = await upstream("referral-a"), await upstream("referral-b")
    port = free_port()
    base = await gateway(
        [dead_upstream()], [first.address, second.address], internal_listen=f"127.0.0.1:{port}"
    )
    internal = URL(f"http://127.0.0.1:{port}")
    names = set()
    for _ in range(4):
        async with session.get(at(internal, "/internal/v1/codes/ABC?x=1")) as response:
            seen = await response.json()
        assert seen["raw_path"] == "/internal/v1/codes/ABC?x=1"
        names.add(seen["upstream"])
    assert names == {"referral-a", "referral-b"}
    for target in ("/api/v1/referral/codes", f"{AUTH}/x", "/internal/../api/v1/referral/x", "/healthz", "/"):
        async with session.get(at(internal, target)) as response:
            assert response.status == 404, target
    assert len(first.calls) + len(second.calls) == 4
    # The public listener still refuses it.
    async with session.get(at(base, "/internal/v1/codes/ABC")) as response:
        await assert_problem(response, 404, "not_found")


async def test_the_internal_listener_fails_over_like_the_public_one(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    second = await upstream("referral-b")
    port = free_port()
    await gateway([dead_upstream()], [dead_upstream(), second.address], internal_listen=f"127.0.0.1:{port}")
    internal = URL(f"http://127.0.0.1:{port}")
    for method in ("GET", "POST", "GET", "POST"):
        async with session.request(method, at(internal, "/internal/v1/referrals"), data=b"{}") as response:
            assert response.status == 200
            assert (await response.json())["upstream"] == "referral-b"


@pytest.mark.parametrize(
    "target",
    [
        "/internal",
        "/internal/",
        "/internal/v1/codes/ABC",
        "/internal/v1/referrals?x=1",
        "/%69nternal/v1/codes/ABC",
        "/internal%2Fv1/codes/ABC",
        f"{AUTH}/../../internal/x",
        f"{AUTH}/../../../internal/v1/codes/ABC",
        f"{REFERRAL}/../../../internal/v1/codes/ABC",
        f"{REFERRAL}/%2e%2e/%2e%2e/%2e%2e/internal/v1/codes/ABC",
        f"{REFERRAL}/%2E%2e/%2e./.%2E/internal/v1/codes/ABC",
        f"{REFERRAL}/..%2f..%2f..%2finternal/v1/codes/ABC",
        f"{REFERRAL}%2f..%2f..%2f..%2finternal/v1/codes/ABC",
        f"{AUTH}/./token",
        f"{AUTH}/%2e/token",
        f"{AUTH}/x/..",
        f"{AUTH}/x/..?q=1",
        f"{AUTH}/oauth/./google/authorize",
        f"{AUTH}/oauth/google/%2e%2e/google/authorize",
        f"{AUTH}/password/../password/forgot",
        f"{AUTH}/email/%2E/verification",
    ],
)
async def test_internal_paths_are_never_exposed(
    upstream: Upstreams, gateway: Gateway, session: Session, target: str
) -> None:
    everything = await upstream("everything")
    base = await gateway([everything.address], [everything.address])
    for method in ("GET", "POST"):
        async with session.request(method, at(base, target), json={}) as response:
            await assert_problem(response, 404, "not_found")
    assert everything.calls == []


async def test_unknown_paths_are_404_problems(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    everything = await upstream("everything")
    base = await gateway([everything.address], [everything.address])
    for target in (
        "/",
        "/nothing/here",
        "/favicon.ico",
        "/api",
        "/api/v1",
        "/api/v1/authx",
        "/api/v2/auth/x",
        "/_gateway/problems/bad_request",
        "/healthz/x",
        "/x/../healthz",
    ):
        async with session.get(at(base, target), headers={"X-Request-ID": "err-42"}) as response:
            await assert_problem(response, 404, "not_found")
            assert response.headers["X-Request-ID"] == "err-42"
    async with session.post(at(base, "/healthz")) as response:
        await assert_problem(response, 404, "not_found")
    assert everything.calls == []


async def test_healthz_is_the_gateways_own(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    everything = await upstream("everything")
    base = await gateway([everything.address], [everything.address])
    async with session.get(at(base, "/healthz")) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert json.loads(await response.read()) == {"status": "ok"}
        assert len(response.headers["X-Request-ID"]) == 32
        assert_gateway_headers(response)
    async with session.head(at(base, "/healthz"), headers={"X-Request-ID": "probe-1"}) as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"] == "probe-1"
    assert everything.calls == []


async def test_request_id_is_kept_or_generated(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    async def echoes(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Request-ID": request.headers["X-Request-ID"] + "-seen"})

    auth = await upstream("auth", {f"{AUTH}/echoes": echoes})
    base = await gateway([auth.address])

    async with session.get(at(base, f"{AUTH}/x"), headers={"X-Request-ID": "abc.DEF_1:2-3"}) as response:
        seen = await response.json()
        assert response.headers.getall("X-Request-ID") == ["abc.DEF_1:2-3"]
        assert header_values(seen, "X-Request-ID") == ["abc.DEF_1:2-3"]

    generated = set()
    for bad in (None, "", "has space", "x" * 129, "semi;colon", "ünï"):
        headers = {} if bad is None else {"X-Request-ID": bad}
        async with session.get(at(base, f"{AUTH}/x"), headers=headers) as response:
            seen = await response.json()
            new = response.headers["X-Request-ID"]
            assert len(new) == 32
            assert int(new, 16) >= 0
            assert header_values(seen, "X-Request-ID") == [new]
            generated.add(new)
    assert len(generated) == 6

    # The upstream's own id wins on the way back (the services adopt the gateway's, so they agree).
    async with session.get(at(base, f"{AUTH}/echoes"), headers={"X-Request-ID": "mine"}) as response:
        assert response.headers.getall("X-Request-ID") == ["mine-seen"]


async def test_forwarded_headers(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address])
    async with session.get(at(base, f"{AUTH}/x")) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "Host") == [f"{base.host}:{base.port}"]

    headers = [
        ("X-Forwarded-For", "203.0.113.7, 198.51.100.1"),
        ("X-Forwarded-For", "192.0.2.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Real-IP", "203.0.113.8"),
        ("Forwarded", "for=203.0.113.9"),
        ("Host", "referrals.example.com:8443"),
    ]
    async with session.get(at(base, f"{AUTH}/x"), headers=headers) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]  # the peer only
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Real-IP") == []
    assert header_values(seen, "Forwarded") == []
    assert header_values(seen, "Host") == ["referrals.example.com:8443"]
    assert header_values(seen, "Connection") == []  # keepalive to the upstream


async def test_body_over_the_limit_is_413(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address], max_body="1k")
    async with session.post(at(base, f"{AUTH}/x"), data=b"a" * 1024) as response:
        assert response.status == 200
        assert len((await response.json())["body"]) == 1024
    async with session.post(
        at(base, f"{AUTH}/x"), data=b"a" * 1025, headers={"X-Request-ID": "big"}
    ) as response:
        await assert_problem(response, 413, "payload_too_large")
        assert response.headers["X-Request-ID"] == "big"

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to judge by
        for _ in range(5):
            yield b"b" * 300

    async with session.post(at(base, f"{AUTH}/x"), data=chunks()) as response:
        await assert_problem(response, 413, "payload_too_large")
    assert auth.calls == [f"{AUTH}/x"]


async def test_the_default_body_limit_is_64k(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address])
    async with session.put(at(base, f"{AUTH}/x"), data=b"a" * 65536) as response:
        assert response.status == 200
    async with session.put(at(base, f"{AUTH}/x"), data=b"a" * 65537) as response:
        await assert_problem(response, 413, "payload_too_large")


async def test_rate_limits(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    auth, referral = await upstream("auth"), await upstream("referral")
    tiny: dict[str, Any] = {
        "token_rate": "1r/m",
        "token_burst": 1,
        "signup_rate": "1r/m",
        "signup_burst": 1,
        "lookup_rate": "2r/m",
        "lookup_burst": 2,
    }
    base = await gateway([auth.address], [referral.address], **tiny)

    async def limited(method: str, target: str, allowed: int, retry_after: str) -> None:
        for _ in range(allowed):
            async with session.request(method, at(base, target), data=b"x=1") as response:
                assert response.status == 200, target
        async with session.request(
            method, at(base, target), headers={"X-Request-ID": "slow-down"}
        ) as response:
            await assert_problem(response, 429, "too_many_requests")
            assert response.headers.getall("Retry-After") == [retry_after]
            assert response.headers["X-Request-ID"] == "slow-down"

    await limited("POST", f"{AUTH}/token", 2, "60")
    await limited("POST", f"{AUTH}/signup", 2, "60")
    await limited("GET", f"{REFERRAL}/codes?email=a%40example.com", 3, "30")
    # The same zone whatever the query or its encoding.
    async with session.get(at(base, f"{REFERRAL}/code%73?email=b%40example.com")) as response:
        await assert_problem(response, 429, "too_many_requests")
    # Creating a code, and every other path, is not limited.
    for _ in range(6):
        async with session.post(at(base, f"{REFERRAL}/codes"), json={}) as response:
            assert response.status == 200
        async with session.get(at(base, f"{REFERRAL}/codes/me")) as response:
            assert response.status == 200
        async with session.post(at(base, f"{AUTH}/revoke")) as response:
            assert response.status == 200
    assert auth.calls.count(f"{AUTH}/token") == 2
    assert auth.calls.count(f"{AUTH}/signup") == 2


@contextlib.asynccontextmanager
async def client_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client (as `session`) whose connections come from `address`: all of 127.0.0.0/8 is
    loopback on Linux, so each address is another client (or proxy) as nginx sees it."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0)),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    ) as client:
        yield client


def config_default(name: str) -> Any:
    return next(field.default for field in dataclasses.fields(GatewayConfig) if field.name == name)


def access_lines(path: Path) -> list[dict[str, Any]]:
    """The gateway's access log lines, but the fixture's own /healthz probes."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["path"] != "/healthz"]


async def logged(path: Path, count: int) -> list[dict[str, Any]]:
    """The access log once it has `count` lines: nginx writes a line after it has sent the answer."""
    deadline = time.monotonic() + 5
    while len(lines := access_lines(path)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return lines


def seconds_between(rate: str) -> int:
    """One interval of an nginx rate (`10r/m`: 6), whole seconds, at least 1."""
    match = re.fullmatch(r"([0-9]+)r/([sm])", rate)
    assert match is not None, rate
    return max(1, -(-(60 if match.group(2) == "m" else 1) // int(match.group(1))))


async def test_without_trusted_proxies_a_client_sent_x_forwarded_for_changes_nothing(
    upstream: Upstreams, gateway: Gateway, tmp_path: Path
) -> None:
    """The default: the gateway is the edge. Neither the address sent upstream nor the rate-limit key
    comes from the client's X-Forwarded-For."""
    auth = await upstream("auth")
    access_log = tmp_path / "access.log"
    base = await gateway([auth.address], token_rate="1r/m", token_burst=1, access_log=str(access_log))
    async with client_from("127.0.0.2") as client:
        async with client.get(at(base, f"{AUTH}/x"), headers={"X-Forwarded-For": "203.0.113.9"}) as response:
            seen = await response.json()
        assert header_values(seen, "X-Forwarded-For") == ["127.0.0.2"]
        for forwarded in ("203.0.113.9", "203.0.113.10", "203.0.113.11"):
            async with client.post(
                at(base, f"{AUTH}/token"), headers={"X-Forwarded-For": forwarded}
            ) as response:
                if forwarded == "203.0.113.11":  # a third "client", but the same peer: its budget is spent
                    await assert_problem(response, 429, "too_many_requests")
                else:
                    assert response.status == 200
    async with client_from("127.0.0.3") as other, other.post(at(base, f"{AUTH}/token")) as response:
        assert response.status == 200  # another peer has its own budget
    assert {line["remote"] for line in await logged(access_log, 5)} == {"127.0.0.2", "127.0.0.3"}


async def test_behind_trusted_proxies_the_client_is_the_address_they_saw(
    upstream: Upstreams, gateway: Gateway, tmp_path: Path
) -> None:
    auth = await upstream("auth")
    access_log = tmp_path / "access.log"
    base = await gateway(
        [auth.address],
        token_rate="1r/m",
        token_burst=1,
        trusted_proxies=("127.0.0.2/32",),
        access_log=str(access_log),
    )

    async def forwarded(client: aiohttp.ClientSession, chain: str | None) -> list[str]:
        """The X-Forwarded-For the upstream got for a request carrying `chain`."""
        headers = {} if chain is None else {"X-Forwarded-For": chain}
        async with client.get(at(base, f"{AUTH}/x"), headers=headers) as response:
            return header_values(await response.json(), "X-Forwarded-For")

    async def token(client: aiohttp.ClientSession, chain: str) -> int:
        async with client.post(at(base, f"{AUTH}/token"), headers={"X-Forwarded-For": chain}) as response:
            if response.status == 429:
                await assert_problem(response, 429, "too_many_requests")
            return response.status

    async with client_from("127.0.0.2") as proxy, client_from("127.0.0.3") as stranger:
        # Upstream, the client's address alone: the one the trusted proxy saw (the last it appended).
        assert await forwarded(proxy, "203.0.113.7") == ["203.0.113.7"]
        assert await forwarded(proxy, "203.0.113.8") == ["203.0.113.8"]
        assert await forwarded(proxy, "198.51.100.1, 203.0.113.7") == ["203.0.113.7"]
        assert await forwarded(proxy, None) == ["127.0.0.2"]  # nothing forwarded: the proxy is the client
        assert await forwarded(stranger, "203.0.113.7") == ["127.0.0.3"]  # not trusted: the peer
        # Each client behind the proxy has its own budget.
        assert [await token(proxy, "203.0.113.7") for _ in range(3)] == [200, 200, 429]
        assert await token(proxy, "203.0.113.8") == 200
        assert await token(proxy, "198.51.100.1, 203.0.113.7") == 429  # the same client as before
        assert await token(proxy, "203.0.113.7, 198.51.100.1") == 200  # here 198.51.100.1 is the client
        # An untrusted peer is keyed by its own address, whatever it claims.
        assert [await token(stranger, f"203.0.113.{n}") for n in (20, 21, 22)] == [200, 200, 429]
        assert await token(proxy, "203.0.113.22") == 200
    # The access log has the client address too (each line, once nginx has written it).
    remotes = sorted(line["remote"] for line in await logged(access_log, 15))
    assert remotes == sorted(
        ["203.0.113.7"] * 6
        + ["203.0.113.8"] * 2
        + ["127.0.0.2", "198.51.100.1", "203.0.113.22"]
        + ["127.0.0.3"] * 4
    )


@pytest.mark.parametrize(
    ("method", "target", "zone"),
    [
        ("GET", f"{AUTH}/oauth/google/authorize?referral_code=ABC", "signin"),
        ("POST", f"{AUTH}/password/forgot", "mail"),
        ("POST", f"{AUTH}/email/verification", "mail"),
    ],
)
async def test_sign_in_and_mail_endpoints_are_rate_limited_per_client_address(
    upstream: Upstreams, gateway: Gateway, method: str, target: str, zone: str
) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address])  # the default limits
    async with client_from("127.0.0.2") as flooder:
        passed = 0
        while True:
            async with flooder.request(
                method, at(base, target), json={}, headers={"X-Request-ID": "flood"}
            ) as response:
                if response.status != 200:
                    await assert_problem(response, 429, "too_many_requests")
                    retry_after = seconds_between(config_default(f"{zone}_rate"))
                    assert response.headers.getall("Retry-After") == [str(retry_after)]
                    assert response.headers["X-Request-ID"] == "flood"
                    break
            passed += 1
            assert passed <= 100, f"{target} is not rate limited"
        assert passed == config_default(f"{zone}_burst") + 1
    assert len(auth.calls) == passed
    async with (
        client_from("127.0.0.3") as other,
        other.request(method, at(base, target), json={}) as response,
    ):
        assert response.status == 200  # another client address still passes
    async with client_from("127.0.0.2") as flooder:
        # One budget per zone: every provider, any encoding of the path, both mail endpoints.
        for limited in (
            f"{AUTH}/oauth/github/authorize" if zone == "signin" else f"{AUTH}/email/verification",
            f"{AUTH}/oauth/google/%61uthorize" if zone == "signin" else f"{AUTH}/password/%66orgot",
        ):
            async with flooder.request(method, at(base, limited), json={}) as response:
                await assert_problem(response, 429, "too_many_requests")
        # Their neighbours are not limited.
        for free in (f"{AUTH}/oauth/google/callback?code=x&state=y", f"{AUTH}/password/reset", f"{AUTH}/me"):
            async with flooder.request(method, at(base, free), json={}) as response:
                assert response.status == 200, free


async def test_the_error_log_never_records_the_lookup_email(gateway: Gateway, tmp_path: Path) -> None:
    """nginx quotes the request line, query and all, in every error-log line about a request; the
    lookup's query is an email. Its rate limit and its upstream failures leave no such line."""
    error_log, access_log = tmp_path / "error.log", tmp_path / "access.log"
    base = await gateway(
        [dead_upstream()],
        [dead_upstream()],  # the referral instances are down
        lookup_rate="1r/m",
        lookup_burst=1,
        error_log=str(error_log),
        access_log=str(access_log),
    )
    lookup = f"{REFERRAL}/codes?email=victim%2B1@example.com"
    async with client_from("127.0.0.2") as client:
        statuses = []
        for _ in range(4):
            async with client.get(at(base, lookup)) as response:
                statuses.append(response.status)
        assert statuses == [502, 502, 429, 429]
        async with client.post(at(base, lookup), json={}) as response:  # creating a code: not limited
            assert response.status == 502
        async with client.get(at(base, lookup), data=b"a" * 70000) as response:
            assert response.status == 413
        # The error log works: another path's connection failure is there, request line and all.
        async with client.get(at(base, f"{REFERRAL}/x?probe=1")) as response:
            assert response.status == 502
    errors = error_log.read_text()
    assert "probe=1" in errors
    assert "victim" not in errors, errors
    assert "example.com" not in errors
    lines = await logged(access_log, 7)
    # In the order the requests finished: the 413's line may come after the next request's (nginx
    # logs it once it has read and dropped the rest of the body, on a connection of its own).
    logged_as = sorted((line["path"], line["status"]) for line in lines)
    codes = f"{REFERRAL}/codes"
    expected = [(codes, 413), (codes, 429), (codes, 429), (codes, 502), (codes, 502), (codes, 502)]
    assert logged_as == sorted([*expected, (f"{REFERRAL}/x", 502)])
    assert "victim" not in access_log.read_text()


async def test_all_upstreams_down_is_502(gateway: Gateway, session: Session) -> None:
    base = await gateway([dead_upstream(), dead_upstream()])
    for method in ("GET", "POST"):
        async with session.request(
            method, at(base, f"{AUTH}/token"), headers={"X-Request-ID": "down-1"}
        ) as response:
            await assert_problem(response, 502, "bad_gateway")
            assert response.headers["X-Request-ID"] == "down-1"
    async with session.get(at(base, f"{REFERRAL}/codes/me")) as response:
        await assert_problem(response, 502, "bad_gateway")


async def test_slow_upstream_is_504(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    auth = await upstream("auth", {f"{AUTH}/slow": slow})
    base = await gateway([auth.address], proxy_timeout=1)
    try:
        started = time.monotonic()
        async with session.get(at(base, f"{AUTH}/slow")) as response:
            body = await assert_problem(response, 504, "gateway_timeout")
        assert time.monotonic() - started < 3
        assert "1 s" in body["detail"]
        async with session.get(at(base, f"{AUTH}/fast")) as response:  # the gateway is still fine
            assert response.status == 200
    finally:
        release.set()


async def test_the_upstreams_own_errors_pass_through_untouched(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    answers = {
        404: b'{"type": "urn:referral-system:problem:code_not_found", "title": "No such code", '
        b'"status": 404, "detail": "No active code.", "code": "code_not_found"}',
        409: b'{"type": "urn:referral-system:problem:email_taken", "title": "Taken", '
        b'"status": 409, "detail": "That email has an account.", "code": "email_taken"}',
        502: b'{"type": "urn:referral-system:problem:x", "status": 502, "code": "x"}',
        503: b'{"type": "urn:referral-system:problem:database_unavailable", "status": 503}',
    }

    async def problem(request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        return web.Response(
            status=status,
            body=answers[status],
            content_type="application/problem+json",
            headers={"Retry-After": "7", "X-Content-Type-Options": "nosniff"},
        )

    auth = await upstream("auth", {f"{AUTH}/problem/{{status}}": problem})
    base = await gateway([auth.address])
    for status, body in answers.items():
        async with session.get(at(base, f"{AUTH}/problem/{status}")) as response:
            assert response.status == status
            assert response.content_type == "application/problem+json"
            assert await response.read() == body
            assert response.headers["Retry-After"] == "7"
            assert_gateway_headers(response)


def directives(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy as {directive: sources}."""
    parsed: dict[str, list[str]] = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        assert name not in parsed, f"{name} twice in {policy}"
        parsed[name] = sources
    return parsed


def test_the_docs_policy_is_strict() -> None:
    for prefix in DOCS_PREFIXES:
        policy = directives(docs_csp(prefix))
        assert policy["default-src"] == ["'self'"]
        scripts = policy["script-src"]
        assert scripts[0] == "'self'"
        assert scripts[1:], "Swagger UI's inline script needs its hash"
        assert all(re.fullmatch(r"'sha256-[A-Za-z0-9+/]{43}='", source) for source in scripts[1:])
        assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
        assert policy["img-src"] == ["'self'", "data:"]
        assert policy["worker-src"] == ["'self'", "blob:"]  # ReDoc's search worker
        assert policy["connect-src"] == ["'self'"]
        assert policy["object-src"] == ["'none'"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["base-uri"] == ["'self'"]
        assert policy["form-action"] == ["'self'"]
        assert "'unsafe-eval'" not in docs_csp(prefix)
        assert "http" not in docs_csp(prefix)  # no other host, no scheme-wide source
    assert directives(API_CSP) == {"default-src": ["'none'"], "frame-ancestors": ["'none'"]}
    # Each service's page allows its own inline script only.
    auth, referral = (set(directives(docs_csp(p))["script-src"][1:]) for p in DOCS_PREFIXES)
    assert not auth & referral


def _inline_scripts(page: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)


async def test_the_docs_policy_admits_the_pages_the_services_really_serve(
    auth_client: Any, aiohttp_client: Any, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """The hashes are computed from apigami's template: they must match the real apps' pages."""
    from services.referral.app import create_app as create_referral_app
    from services.referral.settings import PREFIX, ReferralSettings
    from shared.config import load_settings

    referral_settings = load_settings(
        ReferralSettings,
        PREFIX,
        {"DATABASE_URL": database_url, "REDIS_URL": redis_url, f"{PREFIX}REDIS_PREFIX": redis_prefix},
    )
    referral_client = await aiohttp_client(create_referral_app(referral_settings))
    for client, prefix in ((auth_client, AUTH), (referral_client, REFERRAL)):
        allowed = directives(docs_csp(prefix))["script-src"][1:]
        response = await client.get(f"{prefix}/docs")
        assert response.status == 200
        scripts = _inline_scripts(await response.text())
        assert scripts, "Swagger UI's page has its inline script"
        assert sorted(csp_hash(script) for script in scripts) == sorted(allowed)
        response = await client.get(f"{prefix}/redoc")
        assert response.status == 200
        page = await response.text()
        assert _inline_scripts(page) == []
        assert " style=" not in page  # ReDoc's own page needs no inline style either


async def _page(request: web.Request) -> web.Response:
    return web.Response(
        text="<!DOCTYPE html><title>docs</title>",
        content_type="text/html",
        headers={"Content-Security-Policy": "script-src *", "Server": "Python/3.11 aiohttp/3"},
    )


async def test_the_docs_pages_and_their_assets_get_the_docs_policy(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    auth = await upstream("auth", {f"{AUTH}/{{tail:.*}}": _page})
    referral = await upstream("referral", {f"{REFERRAL}/{{tail:.*}}": _page})
    base = await gateway([auth.address], [referral.address])
    for prefix in (AUTH, REFERRAL):
        for target in (
            "/docs",
            "/redoc",
            "/static/swagger/swagger-ui-bundle.js",
            "/static/redoc/redoc.standalone.js",
            "/static/redoc/logo-mini.svg",
            "/%64ocs",  # the upstream decodes it: the docs page, so the docs policy
        ):
            async with session.get(at(base, prefix + target)) as response:
                assert response.status == 200, target
                # The gateway's policy replaces the upstream's.
                assert response.headers.getall("Content-Security-Policy") == [docs_csp(prefix)], target
                assert_gateway_headers(response)
                assert response.headers.get("Server") == "nginx"
        for target in ("/docs/", "/docsx", "/redoc.json", "/openapi.json", "/me", "/static"):
            async with session.get(at(base, prefix + target)) as response:
                assert response.headers.getall("Content-Security-Policy") == [API_CSP], target


async def test_api_answers_and_the_gateways_own_get_the_data_policy(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    async def json_answer(request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True}, headers={"Content-Security-Policy": "default-src *", "Server": "aiohttp/3"}
        )

    auth = await upstream("auth", {f"{AUTH}/json": json_answer})
    base = await gateway([auth.address], max_body="1k", token_rate="1r/m", token_burst=0)

    async def check(response: aiohttp.ClientResponse) -> None:
        assert response.headers.getall("Content-Security-Policy") == [API_CSP]
        assert_gateway_headers(response)
        assert response.headers.get("Server") == "nginx"

    async with session.get(at(base, f"{AUTH}/json")) as response:
        assert response.status == 200
        await check(response)
    async with session.get(at(base, "/healthz")) as response:
        await check(response)
    async with session.get(at(base, "/nowhere")) as response:
        await assert_problem(response, 404, "not_found")
        await check(response)
    async with session.post(at(base, f"{AUTH}/x"), data=b"a" * 2048) as response:
        await assert_problem(response, 413, "payload_too_large")
        await check(response)
    async with session.get(at(base, f"{REFERRAL}/x")) as response:  # nothing listens there
        await assert_problem(response, 502, "bad_gateway")
        await check(response)
    async with session.post(at(base, f"{AUTH}/token")) as response:
        assert response.status == 200
    async with session.post(at(base, f"{AUTH}/token")) as response:
        await assert_problem(response, 429, "too_many_requests")  # its location sets its own headers
        await check(response)


async def test_cors_preflights_do_not_count_against_the_rate_limits(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address], token_rate="1r/m", token_burst=1, signup_rate="1r/m", signup_burst=1)
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    for target in (f"{AUTH}/token", f"{AUTH}/signup"):
        for _ in range(5):
            async with session.options(at(base, target), headers=preflight) as response:
                assert response.status == 200  # the upstream's answer: nginx passed it on
        for _ in range(2):
            async with session.post(at(base, target)) as response:
                assert response.status == 200
        async with session.post(at(base, target)) as response:
            await assert_problem(response, 429, "too_many_requests")


async def test_no_server_version(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    async def branded(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"Server": "referral-system"})

    auth = await upstream("auth", {f"{AUTH}/branded": branded})
    base = await gateway([auth.address])
    for target in (f"{AUTH}/branded", f"{AUTH}/x", "/healthz", "/nowhere"):
        async with session.get(at(base, target)) as response:
            assert_gateway_headers(response)
            assert "nginx/" not in response.headers.get("Server", "")


async def test_large_answers_are_gzipped_when_asked(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    script = b"window.SwaggerUIBundle = function () { return 42; };\n" * 4000

    async def bundle(request: web.Request) -> web.Response:
        return web.Response(body=script, content_type="application/javascript")

    auth = await upstream("auth", {f"{AUTH}/docs/bundle.js": bundle})
    base = await gateway([auth.address])
    async with session.get(
        at(base, f"{AUTH}/docs/bundle.js"), headers={"Accept-Encoding": "gzip"}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert "Accept-Encoding" in response.headers.get("Vary", "")
        compressed = await response.read()
    assert gzip.decompress(compressed) == script
    assert len(compressed) < len(script) / 10
    async with session.get(at(base, f"{AUTH}/docs/bundle.js")) as response:
        assert "Content-Encoding" not in response.headers
        assert await response.read() == script


async def test_an_overlong_uri_is_a_problem_too(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address])
    async with session.get(at(base, f"{AUTH}/x?q={'a' * 10000}")) as response:
        await assert_problem(response, 414, "uri_too_long")
    assert auth.calls == []


async def test_a_malformed_request_is_a_problem_too(gateway: Gateway) -> None:
    base = await gateway([dead_upstream()])
    assert base.host is not None
    assert base.port is not None
    reader, writer = await asyncio.open_connection(base.host, base.port)
    try:
        writer.write(b"GET /api/v1/auth/x HTTP/1.1\r\nHost: a b\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Type: application/problem+json" in head
    assert json.loads(body)["code"] == "bad_request"


def test_the_launcher_runs_nginx_and_stops_it_whole(tmp_path: Path) -> None:
    from deploy.local import run

    def attempt(into: list[Process]) -> Process:
        gateway = run.gateway(dict(os.environ), free_port(), runtime_dir=tmp_path / "gateway")
        launch(into, [gateway], time.monotonic() + 10)
        return gateway

    gateway, started = start_fresh(attempt)
    try:
        pid = int((tmp_path / "gateway" / "nginx.pid").read_text())
        assert pid == gateway.pid
        assert len(_group_members(pid)) >= 2  # the master and its workers, in one group
    finally:
        problems = stop_all(started)
    assert problems == []
    assert _group_members(pid) == []
    assert http_status(gateway.health_url) is None


def test_a_taken_port_is_reported_as_address_in_use(tmp_path: Path) -> None:
    """What lets the harness pick nginx's port again instead of failing: nginx's bind error is seen."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = write_runtime(
            GatewayConfig(
                auth_upstreams=(dead_upstream(),),
                referral_upstreams=(dead_upstream(),),
                listen=f"127.0.0.1:{port}",
            ),
            tmp_path / "nginx",
        )
        process = Process("nginx", nginx_command(conf), dict(os.environ), port=port, log_dir=tmp_path)
        with pytest.raises(AddressInUse):
            launch([], [process], time.monotonic() + 30)


def test_the_fixture_leaves_no_nginx_behind(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No nginx started by these tests (whose prefix is under this run's temp dir) is still running;
    other pytest runs on the machine (under their own temp dirs) are not ours to judge."""
    run_dir = str(tmp_path_factory.getbasetemp())
    ours = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if command.startswith("nginx") and f"{run_dir}/" in command:
                ours.append(command)
    assert ours == []


# What the gateway passes through untouched (ported from the tests of the former Python dev gateway).


async def test_methods_bodies_and_headers_are_forwarded(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    auth = await upstream("auth")
    base = await gateway([auth.address])
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
        assert header_values(seen, "User-Agent") == []  # nothing added that the client did not send


async def test_the_upstreams_status_and_headers_come_back(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    async def created(request: web.Request) -> web.Response:
        response = web.Response(status=201, text="{}", content_type="application/json")
        response.headers["Location"] = "/api/v1/auth/things/1"
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    auth = await upstream("auth", {f"{AUTH}/created": created, f"{AUTH}/go": redirect})
    base = await gateway([auth.address])
    async with session.post(at(base, f"{AUTH}/created")) as response:
        assert response.status == 201
        assert response.headers["Location"] == "/api/v1/auth/things/1"
        assert len(response.headers.getall("Set-Cookie")) == 2
    async with session.get(at(base, f"{AUTH}/go"), allow_redirects=False) as response:
        assert response.status == 302  # passed back, not followed by the gateway
        assert response.headers["Location"] == "/elsewhere"


async def test_hop_by_hop_headers_are_not_forwarded(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    async def hoppy(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.update(
            {
                "Keep-Alive": "timeout=99",
                "X-End-To-End": "keep",
            }
        )
        return response

    auth = await upstream("auth", {f"{AUTH}/hoppy": hoppy})
    base = await gateway([auth.address])
    sent = {
        "Connection": "keep-alive",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Kept": "yes",
    }
    async with session.get(at(base, f"{AUTH}/x"), headers=sent) as response:
        seen = await response.json()
    names = {name.lower() for name, _ in seen["headers"]}
    for dropped in ("keep-alive", "te", "connection"):
        assert dropped not in names, dropped
    assert header_values(seen, "X-Kept") == ["yes"]

    async with session.get(at(base, f"{AUTH}/hoppy")) as response:
        assert response.status == 200
        assert "Keep-Alive" not in response.headers
        assert response.headers["X-End-To-End"] == "keep"


async def test_a_large_answer_arrives_intact(upstream: Upstreams, gateway: Gateway, session: Session) -> None:
    payload = os.urandom(6 * 1024 * 1024 + 123)

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        view = memoryview(payload)
        for start in range(0, len(payload), 256 * 1024):
            await response.write(view[start : start + 256 * 1024])
        await response.write_eof()
        return response

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    auth = await upstream("auth", {f"{AUTH}/stream": stream, f"{AUTH}/sized": sized})
    base = await gateway([auth.address])
    async with session.get(at(base, f"{AUTH}/stream")) as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(payload).digest()
    async with session.get(at(base, f"{AUTH}/sized")) as response:
        assert response.headers["Content-Length"] == str(len(payload))
        assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(payload).digest()


async def test_an_encoded_answer_passes_untouched(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    compressed = gzip.compress(b'{"hello": "world"}' * 1000)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    auth = await upstream("auth", {f"{AUTH}/gz": gzipped})
    base = await gateway([auth.address])
    async with session.get(at(base, f"{AUTH}/gz"), headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == compressed


async def test_head_is_forwarded_without_a_body(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000, headers={"X-Method": request.method})

    auth = await upstream("auth", {f"{AUTH}/sized": sized})
    base = await gateway([auth.address])
    for _ in range(2):  # and the connection stays usable
        async with session.head(at(base, f"{AUTH}/sized")) as response:
            assert response.status == 200
            assert response.headers["X-Method"] == "HEAD"
            assert response.headers["Content-Length"] == "5000"
            assert await response.read() == b""
    async with session.get(at(base, f"{AUTH}/sized")) as response:
        assert len(await response.read()) == 5000


async def test_an_upstream_breaking_off_midway_breaks_the_client_answer(
    upstream: Upstreams, gateway: Gateway, session: Session
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return response

    auth = await upstream("auth", {f"{AUTH}/broken": broken})
    base = await gateway([auth.address])
    async with session.get(at(base, f"{AUTH}/broken")) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with session.get(at(base, f"{AUTH}/fine")) as response:
        assert response.status == 200
