"""Fixtures of the auth tests: fake third-party servers on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from tests.auth.fakes import FakeErasures, FakeHunter


@pytest.fixture
async def hunter(aiohttp_server: Any) -> FakeHunter:
    """A fake Hunter Email Verifier on loopback; tests arrange its answers and count its calls."""
    state = FakeHunter()

    async def verify(request: web.Request) -> web.Response:
        state.calls.append(dict(request.query))
        await asyncio.sleep(state.delay)
        queue = state.answers.get(request.query.get("email", ""), [])
        status, body = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else state.default
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type="application/json")
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/v2/email-verifier", verify)
    # No access log: the fake would log the query string, key included, as the real Hunter may.
    server = await aiohttp_server(app, access_log=None)
    state.url = str(server.make_url("")).rstrip("/")
    return state


@pytest.fixture
async def erasures(aiohttp_server: Any) -> FakeErasures:
    """A fake referral service on loopback that answers the erasure of a user and records it."""
    state = FakeErasures()

    async def erase(request: web.Request) -> web.Response:
        state.erased.append(
            (
                request.match_info["user_id"],
                request.query.get("replacement_id", ""),
                request.headers.get("Authorization", ""),
            )
        )
        return web.Response(status=204)

    app = web.Application()
    app.router.add_delete("/internal/v1/users/{user_id}", erase)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("")).rstrip("/")
    return state
