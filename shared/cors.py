"""CORS for browser clients on other origins: off unless a service lists the exact origins it allows.

With no origins configured (the default) nothing is added: no `Access-Control-*` header ever, and a
preflight (`OPTIONS`) is answered like any other unsupported method (405/404 problem+json), which a
browser reads as "no". With origins configured (`AUTH_CORS_ORIGINS`, `REFERRAL_CORS_ORIGINS`):

- a preflight from an allowed origin is answered 204 with that origin, the methods, the request
  headers a client may send (`Authorization`, `Content-Type`, `X-Request-ID`, `Idempotency-Key`) and a
  `Max-Age`;
- every other answer to an allowed origin, errors included, carries `Access-Control-Allow-Origin`
  (that origin, never `*`) and `Access-Control-Expose-Headers` (`X-Request-ID`, `Retry-After`,
  `WWW-Authenticate`, `Idempotent-Replayed`), so a script can read them;
- every answer carries `Vary: Origin` (it depends on the Origin), whatever the Origin; a request
  from any other origin gets no `Access-Control-*` header at all.

Tokens travel in the `Authorization` header, never in cookies, so credentials mode is never granted
(no `Access-Control-Allow-Credentials`). `*` is refused as a setting: origins are an allowlist of
exact serialized origins (`https://app.example.com`, `http://localhost:3000`), as browsers send them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from shared.config import SettingsError

ALLOW_METHODS = "GET, HEAD, POST, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID, Idempotency-Key"
EXPOSE_HEADERS = "X-Request-ID, Retry-After, WWW-Authenticate, Idempotent-Replayed"
MAX_AGE = 600  # seconds a browser may cache a preflight (Chromium caps it at 7200)

_ORIGIN = re.compile(
    r"(?P<scheme>https?)://"
    r"(?P<host>[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_CORS_ORIGIN = web.RequestKey("cors_origin", str)
_ALLOWED_ORIGINS = web.AppKey("cors_allowed_origins", frozenset)


def check_origins(origins: Iterable[str], variable: str) -> None:
    """Raise SettingsError naming `variable` unless every entry is one exact origin, as browsers send it."""
    for origin in origins:
        if origin == "*":
            raise SettingsError(
                f"{variable} must list exact origins (https://app.example.com), not '*': "
                "credentials are never granted, and a wildcard would let every site call the API"
            )
        match = _ORIGIN.fullmatch(origin)
        if match is None or (match["port"] and int(match["port"]) > 65535):
            raise SettingsError(
                f"{variable}: {origin!r} is not an origin; write scheme://host[:port], lower-case, "
                "with no path and no trailing slash (https://app.example.com)"
            )
        if match["port"] == _DEFAULT_PORTS[match["scheme"]]:
            raise SettingsError(
                f"{variable}: {origin!r} names its scheme's default port; browsers send the origin "
                f"without it: {match['scheme']}://{match['host']}"
            )


def _add_vary(response: web.StreamResponse, token: str) -> None:
    current = response.headers.get("Vary", "").strip()
    present = {part.strip().lower() for part in current.split(",")}
    if "*" not in present and token.lower() not in present:
        response.headers["Vary"] = f"{current}, {token}" if current else token


def _granted(request: web.Request, allowed: frozenset[str]) -> str | None:
    """The request's Origin when it is exactly one allowed origin, else None."""
    origins = request.headers.getall("Origin", [])
    if len(origins) == 1 and origins[0] in allowed:
        return origins[0]
    return None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer preflights from allowed origins; remember the granted origin for `_decorate`."""
    origin = _granted(request, request.app[_ALLOWED_ORIGINS])
    if origin is None:
        return await handler(request)
    request[_CORS_ORIGIN] = origin
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE),
            },
        )
    return await handler(request)


async def _decorate(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, however made (handler, error middleware, aiohttp itself): the CORS grant."""
    _add_vary(response, "Origin")
    origin = request.get(_CORS_ORIGIN)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    if "Access-Control-Allow-Methods" not in response.headers:  # not on preflight answers
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


def cors_middlewares(app: web.Application, origins: Iterable[str]) -> list[Middleware]:
    """Set CORS up for `origins` on `app`: the middleware to add (none when `origins` is empty).

    The grant headers are added when the answer is prepared, so every answer gets them, whichever
    middleware (or aiohttp itself) made it.
    """
    allowed = tuple(origins)
    if not allowed:
        return []
    check_origins(allowed, "CORS origins")
    app[_ALLOWED_ORIGINS] = frozenset(allowed)
    app.on_response_prepare.append(_decorate)
    return [cors_middleware]
