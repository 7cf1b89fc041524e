"""A real webhook receiver on loopback for the tests: it verifies every request with the Standard
Webhooks reference library, answers as the test plans, and records what came and how many attempts of
one event were in flight at once."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Arrival:
    webhook_id: str
    body: str
    status: int


@dataclass
class Receiver:
    """`plan(webhook_id, attempt)` says how to answer an attempt: a status, or "hang"."""

    secret: str
    plan: Callable[[str, int], int | str] = lambda _id, _attempt: 200
    arrivals: list[Arrival] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why verify() refused a request
    attempts: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    most_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    redirected_hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends the "hang" answers
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def delivered_ids(self) -> set[str]:
        return {a.webhook_id for a in self.arrivals if 200 <= a.status < 300}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Until `predicate()` holds, woken by each request the receiver answers."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.text()
        try:
            event = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as error:
            self.refused.append(str(error))
            self.changed.set()
            return web.Response(status=400)
        webhook_id = request.headers["webhook-id"]
        assert set(event) == {"type", "timestamp", "data"}
        self.attempts[webhook_id] += 1
        self.in_flight[webhook_id] += 1
        self.most_in_flight[webhook_id] = max(self.most_in_flight[webhook_id], self.in_flight[webhook_id])
        try:
            answer = self.plan(webhook_id, self.attempts[webhook_id])
            await asyncio.sleep(0.02)  # an attempt takes a moment: overlapping ones would be seen
            if answer == "hang":
                async with asyncio.timeout(30):
                    await self.release.wait()
                answer = 200
            assert isinstance(answer, int)
            self.arrivals.append(Arrival(webhook_id, body, answer))
            if 300 <= answer < 400:
                raise web.HTTPTemporaryRedirect(location="/elsewhere")
            return web.Response(status=answer)
        finally:
            self.in_flight[webhook_id] -= 1
            self.changed.set()

    async def elsewhere(self, _request: web.Request) -> web.Response:
        self.redirected_hits += 1
        return web.Response(status=200)


async def start_receiver(aiohttp_server: Any, secret: str, **kwargs: Any) -> Receiver:
    receiver = Receiver(secret, **kwargs)
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    app.router.add_post("/elsewhere", receiver.elsewhere)
    server = await aiohttp_server(app, host="127.0.0.1")
    receiver.url = str(server.make_url("/hook"))
    return receiver


def events(receiver: Receiver) -> list[dict[str, Any]]:
    """The events delivered so far, in order of arrival (each verified by the receiver)."""
    return [json.loads(a.body) for a in receiver.arrivals if a.status == 200]


async def wait_for_events(receiver: Receiver, count: int) -> dict[str, dict[str, Any]]:
    """The first `count` events delivered, by type (delivery order is not the order of the changes)."""
    await receiver.wait_for(lambda: len(events(receiver)) >= count)
    delivered = events(receiver)
    assert len(delivered) == count, delivered
    by_type = {event["type"]: event for event in delivered}
    assert len(by_type) == count, delivered
    return by_type
