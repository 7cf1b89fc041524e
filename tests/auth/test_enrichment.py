"""Profile enrichment after signup against a fake Clearbit-compatible Person API served on loopback.

The fake answers `GET /v2/people/find` as each test arranges (per email, a sequence of answers whose
last one repeats), records every call with its Authorization header, and tracks how many calls are
in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from services.auth.appkeys import ENRICHMENT_SCHEDULER
from tests.auth.test_signup import RFC3339
from tests.helpers import Mailbox

SIGNUP = "/api/v1/auth/signup"
VERIFY = "/api/v1/auth/email/verify"
ME = "/api/v1/auth/me"
KEY = "sk_clearbit-KEY-9d2c"
FAST = {"enrichment_api_key": KEY, "enrichment_retry_delay": 0.05, "enrichment_timeout": 1.0}
PERSON = {
    "id": "d54c54ad-40be-4305-8a34-0ab44710b90d",
    "name": {"fullName": "Alex MacCaw", "givenName": "Alex", "familyName": "MacCaw"},
    "email": "alex@example.com",
    "employment": {"domain": "clearbit.com", "name": "Clearbit", "title": "CEO"},
}

Answer = tuple[int, Any]


@dataclass
class FakeClearbit:
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    default: Answer = (200, PERSON)
    delay: float = 0.0
    calls: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""

    def answer(self, email: str, *answers: Answer) -> None:
        self.answers[email] = list(answers)


@pytest.fixture
async def clearbit(aiohttp_server: Any) -> FakeClearbit:
    state = FakeClearbit()

    async def find(request: web.Request) -> web.Response:
        state.calls.append({"email": request.query.get("email", ""), **request.headers})
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        try:
            await asyncio.sleep(state.delay)
        finally:
            state.in_flight -= 1
        queue = state.answers.get(request.query.get("email", ""), [])
        status, body = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else state.default
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type="application/json")
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/v2/people/find", find)
    server = await aiohttp_server(app, access_log=None)
    state.url = str(server.make_url("")).rstrip("/")
    return state


async def signed_up(client: Any, mailbox: Mailbox, email: str) -> tuple[str, float]:
    """Sign up and prove the address, which starts the enrichment; the access token and how long the
    proof's answer took."""
    response = await client.post(SIGNUP, json={"email": email, "password": "correct horse"})
    assert response.status == 201, await response.text()
    token = (await response.json())["access_token"]
    proof = await mailbox.token(email, "verify-email")
    started = time.monotonic()
    verified = await client.post(VERIFY, json={"token": proof})
    elapsed = time.monotonic() - started
    assert verified.status == 200, await verified.text()
    return token, elapsed


async def me(client: Any, token: str) -> dict[str, Any]:
    response = await client.get(ME, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    return dict(await response.json())


async def profile_eventually(client: Any, token: str, timeout: float = 5.0) -> dict[str, Any]:
    """Poll /me until the profile is there (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        profile = (await me(client, token))["profile"]
        if profile is not None:
            return dict(profile)
        assert time.monotonic() < deadline, "no profile in time"
        await asyncio.sleep(0.05)


def assert_stamped(profile: dict[str, Any]) -> None:
    assert profile["source"] == "clearbit"
    assert RFC3339.fullmatch(profile["fetched_at"]), profile


# --- outcomes ----------------------------------------------------------------------------------------


async def test_a_found_person_becomes_the_profile(make_auth_client, clearbit, db, mailbox):
    client = await make_auth_client(enrichment_base_url=clearbit.url, **FAST)
    token, _ = await signed_up(client, mailbox, "alex@example.com")
    profile = await profile_eventually(client, token)
    assert set(profile) == {"status", "person", "source", "fetched_at"}
    assert profile["status"] == "found" and profile["person"] == PERSON
    assert_stamped(profile)
    [call] = clearbit.calls
    assert call["email"] == "alex@example.com"
    assert call["Authorization"] == "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()


async def test_nobody_found_is_stored_as_not_found(make_auth_client, clearbit, db, mailbox):
    clearbit.answer("ghost@example.com", (404, {"error": {"type": "unknown_record", "message": "x"}}))
    client = await make_auth_client(enrichment_base_url=clearbit.url, **FAST)
    token, _ = await signed_up(client, mailbox, "ghost@example.com")
    profile = await profile_eventually(client, token)
    assert set(profile) == {"status", "source", "fetched_at"} and profile["status"] == "not_found"
    assert_stamped(profile)


async def test_202_is_asked_again_after_the_delay(make_auth_client, clearbit, db, mailbox):
    clearbit.answer("queued@example.com", (202, {}), (202, {}), (200, PERSON))
    client = await make_auth_client(
        enrichment_base_url=clearbit.url, **{**FAST, "enrichment_retry_delay": 0.2}
    )
    token, elapsed = await signed_up(client, mailbox, "queued@example.com")
    assert elapsed < 0.5
    started = time.monotonic()
    profile = await profile_eventually(client, token)
    assert time.monotonic() - started >= 0.3, "waited the retry delay twice"
    assert profile["status"] == "found" and len(clearbit.calls) == 3


async def test_202_forever_gives_up_after_max_attempts(make_auth_client, clearbit, db, mailbox):
    clearbit.answer("never@example.com", (202, {}))
    client = await make_auth_client(enrichment_base_url=clearbit.url, enrichment_max_attempts=4, **FAST)
    token, _ = await signed_up(client, mailbox, "never@example.com")
    profile = await profile_eventually(client, token)
    assert (profile["status"], profile["reason"]) == ("unavailable", "still_pending")
    await asyncio.sleep(0.3)  # several retry delays: no further call
    assert len(clearbit.calls) == 4


@pytest.mark.parametrize(
    ("answer", "reason", "level"),
    [
        ((500, {"error": {}}), "server_error", "WARNING"),
        ((401, {"error": {"type": "auth_error"}}), "invalid_api_key", "ERROR"),
        ((402, {"error": {}}), "payment_required", "WARNING"),
        ((422, {"error": {"type": "email_invalid"}}), "rejected_email", "WARNING"),
        ((429, {"error": {}}), "rate_limited", "WARNING"),
        ((200, "{broken"), "malformed_answer", "WARNING"),
        ((200, ["not", "a", "person"]), "malformed_answer", "WARNING"),
    ],
)
async def test_failures_are_stored_as_unavailable(
    make_auth_client, clearbit, db, mailbox, caplog, answer, reason, level
):
    caplog.set_level(logging.INFO)
    clearbit.answer("err@example.com", answer)
    client = await make_auth_client(enrichment_base_url=clearbit.url, **FAST)
    token, _ = await signed_up(client, mailbox, "err@example.com")
    profile = await profile_eventually(client, token)
    assert set(profile) == {"status", "reason", "source", "fetched_at"}
    assert (profile["status"], profile["reason"]) == ("unavailable", reason)
    assert_stamped(profile)
    logged = [r for r in caplog.records if getattr(r, "enricher", None) == "clearbit"]
    assert [(r.levelname, r.reason) for r in logged] == [(level, reason)]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if KEY in r.getMessage()]


async def test_a_slow_vendor_is_unavailable_after_the_timeout(make_auth_client, clearbit, db, mailbox):
    clearbit.delay = 3.0
    client = await make_auth_client(enrichment_base_url=clearbit.url, **{**FAST, "enrichment_timeout": 0.3})
    token, elapsed = await signed_up(client, mailbox, "late@example.com")
    assert elapsed < 0.5
    profile = await profile_eventually(client, token, timeout=2.0)
    assert (profile["status"], profile["reason"]) == ("unavailable", "timeout")


async def test_without_a_key_nothing_is_enriched(make_auth_client, clearbit, db, mailbox):
    client = await make_auth_client(enrichment_base_url=clearbit.url, enrichment_api_key=None)
    token, _ = await signed_up(client, mailbox, "plain@example.com")
    await asyncio.sleep(0.3)
    assert (await me(client, token))["profile"] is None
    assert clearbit.calls == []
    assert ENRICHMENT_SCHEDULER not in client.app


async def test_an_unproven_address_is_never_enriched(make_auth_client, clearbit, db):
    """Tried as an attacker would: claim someone's address at signup; /me would show the vendor's
    profile of whoever owns it. Enrichment waits for the proof."""
    client = await make_auth_client(enrichment_base_url=clearbit.url, **FAST)
    response = await client.post(SIGNUP, json={"email": "victim@example.com", "password": "correct horse"})
    assert response.status == 201
    token = (await response.json())["access_token"]
    await asyncio.sleep(0.5)
    assert clearbit.calls == []
    assert (await me(client, token))["profile"] is None


# --- off the critical path ---------------------------------------------------------------------------


async def test_the_signup_does_not_wait_for_enrichment(make_auth_client, clearbit, db, mailbox):
    clearbit.delay = 2.0
    client = await make_auth_client(enrichment_base_url=clearbit.url, **{**FAST, "enrichment_timeout": 5.0})
    token, elapsed = await signed_up(client, mailbox, "quick@example.com")
    assert elapsed < 1.0, elapsed
    assert (await me(client, token))["profile"] is None, "not there yet"
    started = time.monotonic()
    profile = await profile_eventually(client, token, timeout=5.0)
    assert profile["status"] == "found"
    assert time.monotonic() - started > 1.0, "it came from the slow vendor, later"


async def test_enrichments_run_at_most_concurrency_at_once(make_auth_client, clearbit, db, mailbox):
    clearbit.delay = 0.2
    client = await make_auth_client(enrichment_base_url=clearbit.url, enrichment_concurrency=2, **FAST)
    tokens = [(await signed_up(client, mailbox, f"many{n}@example.com"))[0] for n in range(6)]
    for token in tokens:
        assert (await profile_eventually(client, token))["status"] == "found"
    assert len(clearbit.calls) == 6
    assert clearbit.most_in_flight == 2


# --- shutdown ----------------------------------------------------------------------------------------


def enrichment_records(caplog: Any) -> list[logging.LogRecord]:
    """What the enrichment logged (here the referral service is absent: its notices retry meanwhile)."""
    return [r for r in caplog.records if r.name == "services.auth.adapters.enrichment"]


def enrichment_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("enrichment:") and not t.done()]


async def test_shutdown_waits_for_an_enrichment_in_flight(make_auth_client, clearbit, db, mailbox, caplog):
    clearbit.delay = 0.5
    client = await make_auth_client(enrichment_base_url=clearbit.url, enrichment_shutdown_grace=3.0, **FAST)
    await signed_up(client, mailbox, "finishing@example.com")
    while not clearbit.calls:
        await asyncio.sleep(0.01)
    await client.close()
    assert enrichment_tasks() == []
    with db.cursor() as cursor:
        cursor.execute("SELECT profile->>'status' FROM auth.users")
        assert cursor.fetchone() == ("found",)
    assert not [r for r in enrichment_records(caplog) if r.levelno >= logging.WARNING]


async def test_shutdown_cancels_an_enrichment_past_the_grace(make_auth_client, clearbit, db, mailbox, caplog):
    clearbit.delay = 5.0
    client = await make_auth_client(
        enrichment_base_url=clearbit.url,
        enrichment_shutdown_grace=0.2,
        **{**FAST, "enrichment_timeout": 10.0},
    )
    scheduler = client.app[ENRICHMENT_SCHEDULER]
    await signed_up(client, mailbox, "cut@example.com")
    while not clearbit.calls:
        await asyncio.sleep(0.01)
    assert scheduler.in_flight == 1
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 1.5
    assert scheduler.in_flight == 0 and enrichment_tasks() == []
    with db.cursor() as cursor:
        cursor.execute("SELECT profile FROM auth.users")
        assert cursor.fetchone() == (None,)
    assert not [r for r in enrichment_records(caplog) if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in enrichment_records(caplog) if r.levelno == logging.WARNING] == [
        "person enrichment: 1 cancelled at shutdown after 0.2 s"
    ]
