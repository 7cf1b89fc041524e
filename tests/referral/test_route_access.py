"""Every route of both services: what is not declared public refuses an anonymous call, and the
OpenAPI document's `security` says exactly that (shared/access.py; closed by default)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from shared.access import ACCESS_POLICY, Access
from tests.referral.conftest import System

EXPECTED_PUBLIC = {
    "auth": {
        "POST /api/v1/auth/signup",
        "POST /api/v1/auth/token",
        "POST /api/v1/auth/revoke",
        "GET /api/v1/auth/.well-known/jwks.json",
        "GET /api/v1/auth/.well-known/openid-configuration",
        "GET /api/v1/auth/oauth/{provider}/authorize",
        "GET /api/v1/auth/oauth/{provider}/callback",
        "POST /api/v1/auth/email/verify",
        "POST /api/v1/auth/password/forgot",
        "POST /api/v1/auth/password/reset",
        "GET /api/v1/auth/pages/{name}",
    },
    "referral": {
        "GET /api/v1/referral/codes",
        "GET /api/v1/referral/healthz",
        "GET /api/v1/referral/leaderboard",
    },
}
# Probes, metrics and the documentation pages of each service are public too.
COMMON_PUBLIC = re.compile(
    r"^GET (/healthz|/readyz|/metrics|/api/v1/\w+/(docs|redoc|openapi\.json|static/.*))$"
)


def _routes(app: web.Application) -> list[tuple[str, str, Access]]:
    policy = app[ACCESS_POLICY]
    return [
        (route.method, route.resource.canonical, policy.of(route))
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    ]


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_route_not_declared_public_refuses_an_anonymous_call(system: System) -> None:
    for name, client in (("auth", system.auth), ("referral", system.referral)):
        public = set()
        for method, path, access in _routes(client.app):
            if access is Access.PUBLIC:
                public.add(f"{method} {path}")
                continue
            answer = await client.request(method, _url(path), json={})
            assert answer.status == 401, f"{name}: anonymous {method} {path} answered {answer.status}"
            assert (await answer.json())["code"] == "invalid_token"
        unexpected = {route for route in public - EXPECTED_PUBLIC[name] if not COMMON_PUBLIC.match(route)}
        assert unexpected == set(), f"{name}: public routes nobody listed here"
        assert EXPECTED_PUBLIC[name] <= public


async def test_a_user_token_does_not_open_the_internal_api(system: System) -> None:
    user = await system.user("walker@example.com")
    for method, path, access in _routes(system.referral.app):
        if access is Access.SERVICE:
            answer = await system.referral.request(method, _url(path), json={}, headers=user.headers)
            assert answer.status in (401, 403), f"{method} {path} answered {answer.status} to a user token"


async def test_the_spec_of_each_operation_says_what_its_route_asks(system: System) -> None:
    for client in (system.auth, system.referral):
        access = {(path, method): kind for method, path, kind in _routes(client.app)}
        prefix = "/api/v1/auth" if client is system.auth else "/api/v1/referral"
        spec: dict[str, Any] = await (await client.get(f"{prefix}/openapi.json")).json()
        for path, item in spec["paths"].items():
            for method, operation in item.items():
                kind = access[(path, method.upper())]
                if kind is Access.PUBLIC:
                    assert "security" not in operation, f"{method} {path}"
                else:
                    assert operation["security"], f"{method} {path}"
                    assert "401" in operation["responses"], f"{method} {path} does not document its 401"


# The data-rights routes (API.md "Data rights"): a user's own, and the export's internal call.
EXPECTED_PROTECTED = {
    "auth": {
        ("GET", "/api/v1/auth/sessions"): Access.USER,
        ("DELETE", "/api/v1/auth/sessions/{session_id}"): Access.USER,
        ("GET", "/api/v1/auth/me/export"): Access.USER,
    },
    "referral": {("GET", "/internal/v1/users/{user_id}/export"): Access.SERVICE},
}


async def test_the_data_rights_routes_ask_for_the_right_token(system: System) -> None:
    for name, client in (("auth", system.auth), ("referral", system.referral)):
        routes = {(method, path): access for method, path, access in _routes(client.app)}
        for route, access in EXPECTED_PROTECTED[name].items():
            assert routes.get(route) is access, f"{name}: {route} asks for {routes.get(route)}"
