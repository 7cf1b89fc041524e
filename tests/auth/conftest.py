"""Fixtures of the auth tests: fake third-party servers on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from tests.auth.fakes import FakeHunter


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
