"""Access is closed by default: an unmarked handler refuses anonymous calls (shared/access.py)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp_apigami import docs
from prometheus_client import CollectorRegistry

from shared.access import public, service
from shared.openapi import setup_openapi
from shared.problems import InvalidToken
from shared.tokens import CLAIMS, AccessClaims
from shared.web import setup_common

USER = web.AppKey("user_verifier", Any)
SERVICE = web.AppKey("service_verifier", Any)


class OneTokenVerifier:
    """Accepts exactly one token string: enough to see which verifier a route asked."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def verify(self, token: str) -> AccessClaims:
        if token != self.token:
            raise InvalidToken("unknown token")
        return AccessClaims(
            subject=self.token, email=None, scope=frozenset(), expires_at=0, token_id="t", raw={}
        )


@docs(summary="forgotten")
async def forgotten(request: web.Request) -> web.Response:
    return web.json_response({"sub": request[CLAIMS].subject})


@docs(summary="opened")
@public
async def opened(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@service
async def internal(request: web.Request) -> web.Response:
    return web.json_response({"sub": request[CLAIMS].subject})


def build(*, with_service: bool = True) -> web.Application:
    app = web.Application()
    setup_common(
        app, CollectorRegistry(), user_verifier=USER, service_verifier=SERVICE if with_service else None
    )
    app[USER] = OneTokenVerifier("user-token")
    app[SERVICE] = OneTokenVerifier("service-token")
    app.router.add_get("/api/forgotten", forgotten)
    app.router.add_post("/api/opened", opened)
    app.router.add_get("/internal/thing", internal)
    return app


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_handler_nobody_marked_needs_a_user_token(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build())
    anonymous = await client.get("/api/forgotten")
    assert anonymous.status == 401
    assert (await anonymous.json())["code"] == "invalid_token"
    assert (await client.get("/api/forgotten", headers=bearer("service-token"))).status == 401
    answer = await client.get("/api/forgotten", headers=bearer("user-token"))
    assert answer.status == 200
    assert await answer.json() == {"sub": "user-token"}


async def test_public_and_service_marks(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build())
    assert (await client.post("/api/opened")).status == 200
    assert (await client.get("/internal/thing")).status == 401
    assert (await client.get("/internal/thing", headers=bearer("user-token"))).status == 401
    assert (await client.get("/internal/thing", headers=bearer("service-token"))).status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200, path


async def test_no_route_is_answered_as_such_without_a_token(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build())
    assert (await client.get("/api/nothing-here")).status == 404
    assert (await client.delete("/api/opened")).status == 405


async def test_a_route_asking_for_a_token_nobody_can_verify_stops_the_app() -> None:
    runner = web.AppRunner(build(with_service=False))
    try:
        with pytest.raises(RuntimeError, match="/internal/thing needs a service token; no verifier"):
            await runner.setup()
    finally:
        await runner.cleanup()


async def test_the_spec_says_what_the_marks_say(aiohttp_client: Any) -> None:
    app = build()
    setup_openapi(app, prefix="/api", title="t", version="1", description="d", token_url="/token")
    client = await aiohttp_client(app)
    spec = await (await client.get("/api/openapi.json")).json()
    assert spec["paths"]["/api/forgotten"]["get"]["security"] == [{"bearerAuth": []}, {"oauth2": []}]
    assert "security" not in spec["paths"]["/api/opened"]["post"]
    for path in ("/api/docs", "/api/redoc", "/api/static/redoc/redoc.standalone.js"):
        assert (await client.get(path)).status == 200, path
