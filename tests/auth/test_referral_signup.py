"""Signup with a referral code against a fake referral service served on loopback (a real HTTP server).

The fake answers the internal contract (`POST /internal/v1/codes/{code}/reservations`, its `DELETE`,
`POST /internal/v1/referrals`) as each test arranges, and records what it was sent. The real referral
service is exercised in tests/integration.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from shared.jose import StaticKeySource, parse_jwks
from shared.tokens import TokenVerifier
from tests.auth.test_signup import assert_problem, user_count

SIGNUP = "/api/v1/auth/signup"
OWNER = uuid.UUID("11111111-2222-4333-8444-555555555555")
FAST = {"outbox_poll_interval": 0.05, "outbox_max_backoff": 0.5, "referral_timeout": 0.5}


@dataclass
class FakeReferrals:
    """What the fake answers and what it saw."""

    codes: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    link_statuses: list[int] = field(default_factory=lambda: [201])
    code_delay: float = 0.0
    link_delay: float = 0.0
    links: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    code_paths: list[str] = field(default_factory=list)
    reserved_for: list[str] = field(default_factory=list)  # the referral ids of the reservations
    released: list[tuple[str, str]] = field(default_factory=list)  # (code, referral id)
    url: str = ""

    def valid(self, code: str, owner: uuid.UUID = OWNER) -> None:
        self.codes[code] = (
            200,
            {"code": code, "owner_id": str(owner), "expires_at": "2099-01-01T00:00:00+00:00"},
        )

    def problem(self, code: str, status: int, problem_code: str) -> None:
        self.codes[code] = (status, {"status": status, "code": problem_code, "title": "x", "detail": "x"})


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeReferrals:
    state = FakeReferrals()

    async def check(request: web.Request) -> web.Response:
        state.tokens.append(request.headers.get("Authorization", ""))
        state.code_paths.append(request.raw_path)
        state.reserved_for.append((await request.json())["referral_id"])
        await asyncio.sleep(state.code_delay)
        status, body = state.codes.get(
            request.match_info["code"], (404, {"status": 404, "code": "code_not_found"})
        )
        return web.json_response(body, status=status)

    async def record(request: web.Request) -> web.Response:
        state.tokens.append(request.headers.get("Authorization", ""))
        body = await request.json()
        state.links.append(body)
        await asyncio.sleep(state.link_delay)
        status = state.link_statuses.pop(0) if len(state.link_statuses) > 1 else state.link_statuses[0]
        if status in (200, 201):
            answer = {k: body[k] for k in ("referrer_id", "referral_id")} | {
                "created_at": "2026-01-01T00:00:00Z"
            }
            return web.json_response(answer, status=status)
        return web.json_response({"status": status, "code": "already_referred"}, status=status)

    app = web.Application()

    async def release(request: web.Request) -> web.Response:
        state.released.append((request.match_info["code"], request.match_info["referral_id"]))
        return web.Response(status=204)

    app.router.add_post("/internal/v1/codes/{code}/reservations", check)
    app.router.add_delete("/internal/v1/codes/{code}/reservations/{referral_id}", release)
    app.router.add_post("/internal/v1/referrals", record)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("")).rstrip("/")
    return state


def outbox_rows(db: Any) -> list[dict[str, Any]]:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT referral_id::text, referrer_id::text, referral_email, code, attempts,"
            " delivered_at IS NOT NULL AS delivered, failed_at IS NOT NULL AS failed, last_error"
            " FROM auth.referral_outbox ORDER BY created_at"
        )
        names = [c.name for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def body(email: str, code: str | None = "GOOD1234") -> dict[str, Any]:
    payload: dict[str, Any] = {"email": email, "password": "correct horse"}
    if code is not None:
        payload["referral_code"] = code
    return payload


def add_pending_link(db: Any, email: str) -> str:
    """A user whose link is in the outbox, due now (as left by a crash or an outage)."""
    with db.cursor() as cursor:
        cursor.execute(
            "INSERT INTO auth.users (email, referrer_id) VALUES (%s, %s) RETURNING id::text",
            (email, str(OWNER)),
        )
        (user_id,) = cursor.fetchone()
        cursor.execute(
            "INSERT INTO auth.referral_outbox (referral_id, referrer_id, referral_email, code)"
            " VALUES (%s, %s, %s, 'GOOD1234')",
            (user_id, str(OWNER), email),
        )
    return str(user_id)


# --- the code check ----------------------------------------------------------------------------------


async def test_valid_code_sets_referrer_and_delivers_the_link_at_once(make_auth_client, fake, db):
    fake.valid("GOOD1234")
    client = await make_auth_client(referral_service_url=fake.url)
    response = await client.post(SIGNUP, json=body("new@example.com", "  GOOD1234 "))
    assert response.status == 201, await response.text()
    user = (await response.json())["user"]
    assert user["referrer_id"] == str(OWNER)
    assert fake.reserved_for == [user["id"]]  # the use was reserved for the id the user got
    assert fake.released == []
    with db.cursor() as cursor:
        cursor.execute("SELECT referrer_id::text FROM auth.users WHERE id = %s", (user["id"],))
        assert cursor.fetchone() == (str(OWNER),)
    # Delivered before the answer: the inline attempt is awaited.
    assert fake.links == [
        {
            "referral_id": user["id"],
            "referrer_id": str(OWNER),
            "referral_email": "new@example.com",
            "code": "GOOD1234",
        }
    ]
    [row] = outbox_rows(db)
    assert row["delivered"] and not row["failed"] and row["attempts"] == 1 and row["last_error"] is None


@pytest.mark.parametrize(
    ("status", "problem_code", "expected_status", "expected_code"),
    [
        (404, "code_not_found", 404, "code_not_found"),
        (410, "code_expired", 410, "code_expired"),
        (409, "code_exhausted", 409, "code_exhausted"),
        (422, "validation_failed", 404, "code_not_found"),  # no code can look like that
    ],
)
async def test_unknown_and_expired_codes_create_nobody(
    make_auth_client, fake, db, status, problem_code, expected_status, expected_code
):
    fake.problem("BAD12345", status, problem_code)
    client = await make_auth_client(referral_service_url=fake.url)
    response = await client.post(SIGNUP, json=body("bad@example.com", "BAD12345"))
    await assert_problem(response, expected_status, expected_code)
    assert user_count(db) == 0
    assert outbox_rows(db) == []
    assert fake.links == []


async def test_the_code_is_url_encoded_in_the_path(make_auth_client, fake, db):
    client = await make_auth_client(referral_service_url=fake.url)
    response = await client.post(SIGNUP, json=body("enc@example.com", "a/b?c#d %"))
    await assert_problem(response, 404, "code_not_found")
    assert fake.code_paths == []  # a slash cannot be in a code: refused without asking
    response = await client.post(SIGNUP, json=body("enc@example.com", "ab?c#d %é"))
    await assert_problem(response, 404, "code_not_found")
    assert fake.code_paths == ["/internal/v1/codes/ab%3Fc%23d%20%25%C3%A9/reservations"]


@pytest.mark.parametrize("answer", [500, 502, 401, 403, 404])
async def test_a_failing_referral_service_is_503_with_retry_after(make_auth_client, fake, db, answer):
    # 404 without code_not_found is not the code endpoint answering (a wrong URL): not "unknown code".
    fake.codes["GOOD1234"] = (answer, {"status": answer, "code": "something_else"})
    client = await make_auth_client(referral_service_url=fake.url)
    response = await client.post(SIGNUP, json=body("down@example.com"))
    await assert_problem(response, 503, "referral_service_unavailable")
    assert response.headers["Retry-After"].isdigit()
    assert user_count(db) == 0


async def test_a_slow_referral_service_is_503_within_the_timeout(make_auth_client, fake, db):
    fake.valid("GOOD1234")
    fake.code_delay = 3.0
    client = await make_auth_client(referral_service_url=fake.url, referral_timeout=0.3)
    started = time.monotonic()
    response = await client.post(SIGNUP, json=body("slow@example.com"))
    elapsed = time.monotonic() - started
    await assert_problem(response, 503, "referral_service_unavailable")
    assert elapsed < 1.5, elapsed
    assert user_count(db) == 0


async def test_a_malformed_code_answer_is_503(make_auth_client, fake, db):
    fake.codes["GOOD1234"] = (200, {"code": "GOOD1234", "owner_id": "not-a-uuid"})
    client = await make_auth_client(referral_service_url=fake.url)
    response = await client.post(SIGNUP, json=body("odd@example.com"))
    await assert_problem(response, 503, "referral_service_unavailable")
    assert user_count(db) == 0


async def test_email_taken_is_answered_before_the_code_is_checked(make_auth_client, fake, db):
    fake.valid("GOOD1234")
    client = await make_auth_client(referral_service_url=fake.url)
    await client.post(SIGNUP, json=body("twice@example.com", None))
    response = await client.post(SIGNUP, json=body("twice@example.com"))
    await assert_problem(response, 409, "email_taken")
    assert fake.code_paths == []


# --- the service token -------------------------------------------------------------------------------


async def test_calls_carry_one_cached_service_token(make_auth_client, fake, db, auth_settings):
    fake.valid("GOOD1234")
    client = await make_auth_client(referral_service_url=fake.url)
    for n in range(2):
        response = await client.post(SIGNUP, json=body(f"tok{n}@example.com"))
        assert response.status == 201, await response.text()
    assert len(fake.tokens) == 4
    assert len(set(fake.tokens)) == 1, "signed once, reused"
    scheme, _, token = fake.tokens[0].partition(" ")
    assert scheme == "Bearer"
    jwks = await (await client.get("/api/v1/auth/.well-known/jwks.json")).json()
    keys = StaticKeySource(list(parse_jwks(jwks).values()))
    claims = await TokenVerifier(keys, issuer=auth_settings.issuer, audience="referral-service").verify(token)
    assert claims.subject == "auth-service"
    assert claims.scope == frozenset({"referrals:internal"})
    assert claims.email is None
    assert 0 < claims.expires_at - time.time() <= 300
    # Not a user token: the user audience refuses it.
    user_verifier = TokenVerifier(keys, issuer=auth_settings.issuer, audience=auth_settings.token_audience)
    with pytest.raises(Exception, match="aud"):
        await user_verifier.verify(token)


# --- the outbox --------------------------------------------------------------------------------------


async def test_a_failed_delivery_does_not_fail_the_signup_and_is_retried(make_auth_client, fake, db):
    fake.valid("GOOD1234")
    fake.link_statuses = [503, 500, 401, 201]
    client = await make_auth_client(referral_service_url=fake.url, **FAST)
    response = await client.post(SIGNUP, json=body("retry@example.com"))
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    await eventually(lambda: outbox_rows(db)[0]["delivered"])
    [row] = outbox_rows(db)
    assert row["attempts"] == 4 and row["last_error"] is None
    assert [link["referral_id"] for link in fake.links] == [user_id] * 4


async def test_a_lost_answer_is_delivered_again(make_auth_client, fake, db):
    """A timeout after the referral service recorded the link: the retry gets 200 and is done."""
    fake.valid("GOOD1234")
    fake.link_delay = 1.0
    client = await make_auth_client(referral_service_url=fake.url, **FAST)
    response = await client.post(SIGNUP, json=body("lost@example.com"))
    assert response.status == 201, await response.text()
    assert outbox_rows(db)[0]["last_error"] == "TimeoutError"
    fake.link_delay = 0.0
    fake.link_statuses = [200]
    await eventually(lambda: outbox_rows(db)[0]["delivered"])
    assert len(fake.links) == 2


@pytest.mark.parametrize("refusal", [409, 422])
async def test_a_permanent_refusal_is_never_retried(make_auth_client, fake, db, refusal, caplog):
    fake.valid("GOOD1234")
    fake.link_statuses = [refusal]
    client = await make_auth_client(referral_service_url=fake.url, **FAST)
    response = await client.post(SIGNUP, json=body("refused@example.com"))
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    await asyncio.sleep(0.5)  # many poll intervals
    [row] = outbox_rows(db)
    assert row["failed"] and not row["delivered"] and row["attempts"] == 1
    assert str(refusal) in row["last_error"]
    assert len(fake.links) == 1
    errors = [
        r for r in caplog.records if r.levelname == "ERROR" and getattr(r, "referral_id", None) == user_id
    ]
    assert errors, caplog.records


async def test_links_left_pending_are_delivered_after_a_restart(make_auth_client, fake, db):
    ids = [add_pending_link(db, f"left{n}@example.com") for n in range(3)]
    await make_auth_client(referral_service_url=fake.url, **FAST)
    await eventually(lambda: all(row["delivered"] for row in outbox_rows(db)))
    assert sorted(link["referral_id"] for link in fake.links) == sorted(ids)


async def test_replicas_never_deliver_the_same_link_twice(make_auth_client, fake, db):
    fake.link_delay = 0.05
    ids = [add_pending_link(db, f"many{n}@example.com") for n in range(60)]
    for _ in range(3):
        await make_auth_client(referral_service_url=fake.url, **FAST)
    await eventually(lambda: all(row["delivered"] for row in outbox_rows(db)))
    delivered = [link["referral_id"] for link in fake.links]
    assert sorted(delivered) == sorted(ids), "each link exactly once"


async def test_shutdown_finishes_the_delivery_in_flight(make_auth_client, fake, db):
    fake.link_delay = 0.4
    client = await make_auth_client(referral_service_url=fake.url, **{**FAST, "referral_timeout": 2.0})
    add_pending_link(db, "inflight@example.com")
    await eventually(lambda: len(fake.links) == 1)
    await client.close()
    [row] = outbox_rows(db)
    assert row["delivered"], row


async def test_a_user_deleted_before_delivery_takes_its_link_along(make_auth_client, fake, db):
    user_id = add_pending_link(db, "gone@example.com")
    with db.cursor() as cursor:
        cursor.execute("DELETE FROM auth.users WHERE id = %s", (user_id,))
    assert outbox_rows(db) == []
