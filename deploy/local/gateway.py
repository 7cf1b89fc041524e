"""A development gateway: `python -m deploy.local.gateway --route /api/v1/auth=http://127.0.0.1:8081 ...`.

A small aiohttp reverse proxy for machines without nginx, serving the URL layout the nginx gateway
will: each request goes, path and query unchanged, to an upstream of the route whose prefix is the
longest match for its path (round-robin over a route's upstreams). `/internal/` is never exposed.
The gateway sets `X-Request-ID`, `X-Forwarded-For` and `X-Forwarded-Proto`, drops hop-by-hop
headers, streams response bodies, and answers its own errors as problem+json: 404 `not_found`,
413 `payload_too_large`, 502 `bad_gateway`, 504 `gateway_timeout`. Its own `GET /healthz` is 200.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from shared.errors import problem_response
from shared.logs import (
    REQUEST_ID,
    REQUEST_ID_HEADER,
    JsonAccessLogger,
    adopt_request_id,
    configure_logging,
    request_id_var,
)

log = logging.getLogger("deploy.local.gateway")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BODY = 1024 * 1024
INTERNAL_PREFIX = "/internal"
HEALTH_PATH = "/healthz"
# The same rule as the services' request-id middleware (shared/logs.py).
# Hop-by-hop headers (RFC 9110 section 7.6.1) are the connection's, not the message's; Host is the
# upstream's (aiohttp sets it); Content-Length is recomputed for the buffered request body; Expect is
# answered by this server (the body is read before the upstream is asked).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "expect"}
# aiohttp's client would otherwise add these when the caller did not send them.
_NO_AUTO_HEADERS = (hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE)


@dataclass(slots=True)
class Route:
    """A path prefix and the upstream origins (`http://host:port`) that serve it, used in turn."""

    prefix: str
    upstreams: tuple[URL, ...]
    _turns: Iterator[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._turns = itertools.cycle(range(len(self.upstreams)))

    def matches(self, path: str) -> bool:
        """Whether `path` is the prefix itself or lies below it."""
        return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")

    def rotation(self) -> list[URL]:
        """Every upstream once, starting with the next one in round-robin order."""
        start = next(self._turns)
        return [*self.upstreams[start:], *self.upstreams[:start]]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The routing table (longest prefix first) and the limits."""

    routes: tuple[Route, ...]
    timeout: float
    max_body: int

    def route_for(self, path: str) -> Route | None:
        """The route with the longest prefix matching `path`, if any."""
        return next((route for route in self.routes if route.matches(path)), None)


CONFIG = web.AppKey("gateway_config", GatewayConfig)
SESSION = web.AppKey("gateway_session", aiohttp.ClientSession)


def parse_prefix(prefix: str) -> str:
    """A route prefix normalised to start with `/` and not end with one (`/` itself becomes "")."""
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix:
        raise ValueError(f"a route prefix must be a path starting with '/', got {prefix!r}")
    return prefix.rstrip("/")


def parse_upstream(raw: str) -> URL:
    """An upstream origin `http(s)://host[:port]`; a path, query or credentials are refused."""
    url = URL(raw.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"an upstream must be an http:// or https:// URL with a host, got {raw!r}")
    if url.path not in ("", "/") or url.query_string or url.fragment or url.user or url.password:
        raise ValueError(f"an upstream is an origin only (no path, query or credentials), got {raw!r}")
    return url.origin()


def parse_route(spec: str) -> tuple[str, list[str]]:
    """`PREFIX=URL[,URL...]` (the --route option) as a prefix and its upstream URLs."""
    prefix, equals, upstreams = spec.partition("=")
    urls = [part.strip() for part in upstreams.split(",") if part.strip()]
    if not equals or not urls:
        raise ValueError(f"a route is PREFIX=URL[,URL...], got {spec!r}")
    return prefix.strip(), urls


def build_config(
    routes: Mapping[str, Sequence[str]], *, timeout: float = DEFAULT_TIMEOUT, max_body: int = DEFAULT_MAX_BODY
) -> GatewayConfig:
    """Validate the routes (prefix -> upstream URLs) and limits into a GatewayConfig."""
    if timeout <= 0:
        raise ValueError(f"the timeout must be positive, got {timeout}")
    if max_body < 0:
        raise ValueError(f"the body limit must not be negative, got {max_body}")
    built: dict[str, Route] = {}
    for raw_prefix, raw_upstreams in routes.items():
        if isinstance(raw_upstreams, str):
            raise TypeError(f"give the upstreams of {raw_prefix!r} as a sequence of URLs")
        prefix = parse_prefix(raw_prefix)
        if prefix in built:
            raise ValueError(f"the route {raw_prefix!r} is given twice")
        upstreams = tuple(parse_upstream(url) for url in raw_upstreams)
        if not upstreams:
            raise ValueError(f"the route {raw_prefix!r} has no upstream")
        built[prefix] = Route(prefix, upstreams)
    ordered = sorted(built.values(), key=lambda route: len(route.prefix), reverse=True)
    return GatewayConfig(tuple(ordered), timeout, max_body)


def create_app(
    routes: Mapping[str, Sequence[str]], *, timeout: float = DEFAULT_TIMEOUT, max_body: int = DEFAULT_MAX_BODY
) -> web.Application:
    """The gateway app: `routes` maps a path prefix to its upstream origins, e.g. `{"/api": ["http://h:1"]}`."""
    app = web.Application(middlewares=[_request_id_middleware])
    app[CONFIG] = build_config(routes, timeout=timeout, max_body=max_body)
    app.cleanup_ctx.append(_client_session)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    timeout = app[CONFIG].timeout
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=15),
        timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
    )
    app[SESSION] = session
    try:
        yield
    finally:
        await session.close()


@web.middleware
async def _request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = adopt_request_id(request)
    token = request_id_var.set(request_id)
    try:
        response = await handler(request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        detail = "The gateway could not complete the request; it has been logged."
        response = _problem(500, "internal_error", "Internal server error", detail)
    finally:
        request_id_var.reset(token)
    if not response.prepared:
        response.headers.setdefault(REQUEST_ID_HEADER, request_id)
    return response


def _problem(status: int, code: str, title: str, detail: str) -> web.Response:
    return problem_response(status, code, title, detail)


def _not_found() -> web.Response:
    return _problem(404, "not_found", "No such resource", "No resource is served at this path.")


def _has_dot_segment(path: str) -> bool:
    # nginx would resolve `.` and `..` before matching, while the upstream sees the raw path: refusing
    # them keeps the gateway's idea of the path and the upstream's the same (no way around /internal/).
    return any(segment in (".", "..") for segment in path.split("/"))


async def _handle(request: web.Request) -> web.StreamResponse:
    path = request.path  # percent-decoded, so `/%69nternal/` is caught too
    if path == HEALTH_PATH and request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        return web.json_response({"status": "ok"})
    if path == INTERNAL_PREFIX or path.startswith(INTERNAL_PREFIX + "/") or _has_dot_segment(path):
        return _not_found()
    config = request.app[CONFIG]
    route = config.route_for(path)
    if route is None:
        return _not_found()
    body = await _read_body(request, config.max_body)
    if body is None:
        response = _problem(
            413,
            "payload_too_large",
            "The request body is too large",
            f"The body must not exceed {config.max_body} bytes.",
        )
        response.force_close()  # the rest of the body is not read
        return response
    return await _proxy(request, route, body)


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds `limit` bytes (nginx buffers bodies too)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in `Connection` (hop-by-hop for this message too)."""
    return {
        token.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, [])
        for token in value.split(",")
        if token.strip()
    }


def _end_to_end(headers: CIMultiDictProxy[str], also: frozenset[str]) -> CIMultiDict[str]:
    """The headers with hop-by-hop ones (and `also`) left out, repeated headers kept."""
    dropped = also | _connection_tokens(headers)
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in dropped and not name.lower().startswith("proxy-")
    )


def upstream_headers(request: web.Request) -> CIMultiDict[str]:
    """The headers sent upstream: the client's end-to-end ones plus request id and X-Forwarded-*."""
    headers = _end_to_end(request.headers, _NOT_FORWARDED)
    headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    # The gateway is the edge: the peer only, never a chain the client made up (as nginx does).
    headers.popall(hdrs.X_FORWARDED_FOR, None)
    if request.remote:
        headers[hdrs.X_FORWARDED_FOR] = request.remote
    headers[hdrs.X_FORWARDED_PROTO] = "http"
    return headers


def _target(request: web.Request) -> str:
    # The path and query exactly as the client sent them (origin-form); rel_url for absolute-form.
    raw = request.raw_path
    return raw if raw.startswith("/") else request.rel_url.raw_path_qs


async def _proxy(request: web.Request, route: Route, body: bytes) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = upstream_headers(request)
    target = _target(request)
    for upstream in route.rotation():
        # A BytesIO is sent in chunks (aiohttp warns about large raw bytes bodies); None: no body at all.
        data = io.BytesIO(body) if body else None
        url = URL(str(upstream) + target, encoded=True)
        try:
            answer = await session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as error:
            # Not connected, so nothing was sent: the next upstream may take it (as nginx does).
            log.warning("upstream unreachable", extra={"upstream": str(upstream), "error": str(error)})
            continue
        except TimeoutError:
            log.warning("upstream timed out", extra={"upstream": str(upstream), "path": request.path})
            return _problem(
                504,
                "gateway_timeout",
                "The upstream service did not answer in time",
                f"No answer within {request.app[CONFIG].timeout:g} s.",
            )
        except aiohttp.ClientError as error:
            log.warning("upstream failed", extra={"upstream": str(upstream), "error": repr(error)})
            return _bad_gateway()
        try:
            return await _relay(request, answer)
        finally:
            answer.release()
    return _bad_gateway()


def _bad_gateway() -> web.Response:
    return _problem(
        502,
        "bad_gateway",
        "The upstream service is unavailable",
        "The upstream service could not be reached.",
    )


async def _relay(request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream the upstream's answer to the client; a failure midway cuts the client's connection."""
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    response.headers.extend(_end_to_end(answer.headers, _HOP_BY_HOP))
    response.headers.setdefault(REQUEST_ID_HEADER, request[REQUEST_ID])
    try:
        await response.prepare(request)
        while True:
            try:
                chunk = await answer.content.readany()
            except (aiohttp.ClientError, TimeoutError) as error:
                # The status line is gone already: the only honest signal left is a broken connection.
                log.warning("upstream broke off the response", extra={"error": repr(error)})
                response.force_close()
                if request.transport is not None:
                    request.transport.close()
                return response
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; aiohttp closes its side
    return response


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: --host, --port, --route PREFIX=URL[,URL...] (repeatable), --timeout, --max-body."""
    parser = argparse.ArgumentParser(prog="python -m deploy.local.gateway", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="PREFIX=URL[,URL...]",
        help="send paths under PREFIX to these upstreams, in turn (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for an upstream to connect or send data (default %(default)s)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=DEFAULT_MAX_BODY,
        help="largest body, bytes (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.route:
        parser.error("give at least one --route PREFIX=URL[,URL...]")
    routes: dict[str, list[str]] = {}
    for spec in args.route:
        try:
            prefix, urls = parse_route(spec)
        except ValueError as error:
            parser.error(str(error))
        if prefix in routes:
            parser.error(f"the route {prefix!r} is given twice")
        routes[prefix] = urls
    args.routes = routes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the command line and serve until SIGINT or SIGTERM."""
    args = parse_args(argv)
    configure_logging("gateway", args.log_level)
    try:
        app = create_app(args.routes, timeout=args.timeout, max_body=args.max_body)
    except ValueError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    log.info(
        "listening",
        extra={
            "host": args.host,
            "port": args.port,
            "routes": {
                route.prefix or "/": [str(url) for url in route.upstreams] for route in app[CONFIG].routes
            },
        },
    )
    web.run_app(
        app, host=args.host, port=args.port, access_log_class=JsonAccessLogger, print=None, shutdown_timeout=5
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
