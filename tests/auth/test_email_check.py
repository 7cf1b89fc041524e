"""Email verification at signup against a fake Hunter Email Verifier served on loopback.

The fake answers `GET /v2/email-verifier` as each test arranges (per email, a sequence of answers
whose last one repeats) and records every call, so tests count what Hunter was asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from datetime import datetime
from typing import Any

import pytest
import redis

from services.auth.appkeys import AUTH_SERVICE
from services.auth.domain.errors import EmailUndeliverable
from shared.logs import JsonFormatter
from tests.auth.fakes import FAST, KEY, hunter_error, verdict
from tests.auth.test_signup import RFC3339, assert_problem, user_count

SIGNUP = "/api/v1/auth/signup"
ME = "/api/v1/auth/me"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stored_check(db: Any, email: str) -> Any:
    with db.cursor() as cursor:
        cursor.execute("SELECT email_check FROM auth.users WHERE lower(email) = lower(%s)", (email,))
        row = cursor.fetchone()
    assert row is not None, f"no user {email}"
    return row[0]


def delete_user(db: Any, email: str) -> None:
    with db.cursor() as cursor:
        cursor.execute("DELETE FROM auth.users WHERE lower(email) = lower(%s)", (email,))


async def post_signup(client: Any, email: str) -> Any:
    return await client.post(SIGNUP, json={"email": email, "password": "correct horse"})


def assert_unchecked(check: Any, reason: str) -> None:
    assert check["status"] == "unchecked", check
    assert check["reason"] == reason, check
    assert check["source"] == "hunter"
    assert RFC3339.fullmatch(check["checked_at"]), check
    assert "score" not in check


# --- verdicts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["valid", "accept_all", "webmail", "unknown"])
async def test_accepted_verdicts_are_stored_and_shown_on_me(make_auth_client, hunter, db, status):
    hunter.answer("ok@example.com", verdict(status, 77))
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    response = await post_signup(client, "ok@example.com")
    assert response.status == 201, await response.text()
    body = await response.json()
    assert set(body["user"]) == {
        "id",
        "email",
        "email_verified",
        "created_at",
        "referrer_id",
    }  # the signup body is unchanged
    check = stored_check(db, "ok@example.com")
    assert set(check) == {"status", "score", "source", "checked_at"}
    assert (check["status"], check["score"], check["source"]) == (status, 77, "hunter")
    checked_at = datetime.fromisoformat(check["checked_at"])
    assert RFC3339.fullmatch(check["checked_at"]) and checked_at.utcoffset() is not None
    me = await client.get(ME, headers={"Authorization": f"Bearer {body['access_token']}"})
    assert (await me.json())["email_check"] == check
    assert hunter.calls == [{"email": "ok@example.com", "api_key": KEY}]


@pytest.mark.parametrize("status", ["invalid", "disposable"])
async def test_undeliverable_verdicts_refuse_the_signup_and_create_nothing(
    make_auth_client, hunter, db, status
):
    hunter.answer("bad@example.com", verdict(status, 10))
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    response = await post_signup(client, "bad@example.com")
    problem = await assert_problem(response, 422, "email_undeliverable")
    assert "email" in problem["errors"]
    assert user_count(db) == 0
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.refresh_tokens")
        assert cursor.fetchone() == (0,)


async def test_a_missing_score_is_stored_as_null(make_auth_client, hunter, db):
    hunter.answer("noscore@example.com", verdict("webmail", None))
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    assert (await post_signup(client, "noscore@example.com")).status == 201
    check = stored_check(db, "noscore@example.com")
    assert check["status"] == "webmail" and check["score"] is None


# --- 202: still verifying ----------------------------------------------------------------------------


async def test_202_is_polled_until_the_verdict(make_auth_client, hunter, db):
    hunter.answer("slowly@example.com", (202, {}), (202, {}), verdict("valid", 88))
    client = await make_auth_client(hunter_base_url=hunter.url, **{**FAST, "hunter_poll_interval": 0.2})
    started = time.monotonic()
    response = await post_signup(client, "slowly@example.com")
    elapsed = time.monotonic() - started
    assert response.status == 201, await response.text()
    assert hunter.calls_for("slowly@example.com") == 3
    assert elapsed >= 0.4, "waits the poll interval between calls"
    check = stored_check(db, "slowly@example.com")
    assert (check["status"], check["score"]) == ("valid", 88)


async def test_202_forever_is_unchecked_after_max_polls(make_auth_client, hunter, db):
    hunter.answer("pending@example.com", (202, {}))
    client = await make_auth_client(hunter_base_url=hunter.url, hunter_max_polls=4, **FAST)
    response = await post_signup(client, "pending@example.com")
    assert response.status == 201, await response.text()
    assert hunter.calls_for("pending@example.com") == 4
    assert_unchecked(stored_check(db, "pending@example.com"), "still_verifying")


# --- failing open ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason", "level"),
    [
        (hunter_error(500), "server_error", "WARNING"),
        (hunter_error(503), "server_error", "WARNING"),
        (hunter_error(403), "rate_limited", "WARNING"),
        (hunter_error(429), "out_of_credits", "WARNING"),
        (hunter_error(401), "invalid_api_key", "ERROR"),
        (hunter_error(451), "processing_refused", "WARNING"),
        (hunter_error(400), "bad_request", "WARNING"),
        ((222, {"data": {"status": "unknown"}}), "remote_server_error", "WARNING"),
        (hunter_error(418), "http_418", "WARNING"),
        ((200, "{not json"), "malformed_answer", "WARNING"),
        ((200, {"data": {"status": "maybe"}}), "malformed_answer", "WARNING"),
        ((200, ["valid"]), "malformed_answer", "WARNING"),
    ],
)
async def test_hunter_failures_fail_open(make_auth_client, hunter, db, caplog, answer, reason, level):
    caplog.set_level(logging.INFO)
    hunter.answer("open@example.com", answer)
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    response = await post_signup(client, "open@example.com")
    assert response.status == 201, await response.text()
    assert_unchecked(stored_check(db, "open@example.com"), reason)
    logged = [r for r in caplog.records if getattr(r, "verifier", None) == "hunter"]
    assert [(r.levelname, r.reason) for r in logged] == [(level, reason)]  # type: ignore[attr-defined]


async def test_a_slow_hunter_is_unchecked_within_about_the_timeout(make_auth_client, hunter, db):
    hunter.delay = 5.0
    client = await make_auth_client(hunter_base_url=hunter.url, **{**FAST, "hunter_timeout": 0.3})
    started = time.monotonic()
    response = await post_signup(client, "slow@example.com")
    elapsed = time.monotonic() - started
    assert response.status == 201, await response.text()
    assert elapsed < 1.3, elapsed
    assert_unchecked(stored_check(db, "slow@example.com"), "timeout")
    assert len(hunter.calls) == 1, "a timeout is not polled again"


async def test_an_unreachable_hunter_is_unchecked(make_auth_client, db):
    client = await make_auth_client(hunter_base_url=f"http://127.0.0.1:{free_port()}", **FAST)
    response = await post_signup(client, "nobody-home@example.com")
    assert response.status == 201, await response.text()
    check = stored_check(db, "nobody-home@example.com")
    assert check["status"] == "unchecked" and check["reason"].startswith("connection_error:"), check


# --- the cache ---------------------------------------------------------------------------------------


async def test_a_refused_email_is_not_asked_again(make_auth_client, hunter, db, redis_url, redis_prefix):
    hunter.answer("Spam@Example.com", verdict("disposable", 0))
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    await assert_problem(await post_signup(client, "Spam@Example.com"), 422, "email_undeliverable")
    await assert_problem(await post_signup(client, "spam@example.com"), 422, "email_undeliverable")
    await assert_problem(await post_signup(client, " SPAM@example.COM "), 422, "email_undeliverable")
    assert len(hunter.calls) == 1
    # The key holds a hash of the lower-cased address, not the address.
    store = redis.Redis.from_url(redis_url)
    try:
        # (The deny-list's key, under the same prefix, holds digests of erased ids: not this cache's.)
        keys = [
            k.decode()
            for k in store.scan_iter(match=f"{redis_prefix}*")
            if not k.decode().startswith(f"{redis_prefix}deny:")
        ]
        digest = hashlib.sha256(b"spam@example.com").hexdigest()
        assert keys == [f"{redis_prefix}email-check:{digest}"]
        assert 0 < store.ttl(keys[0]) <= 7 * 24 * 3600
        assert json.loads(store.get(keys[0]))["status"] == "disposable"
    finally:
        store.close()


async def test_an_accepted_verdict_is_reused_with_its_original_time(make_auth_client, hunter, db):
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    assert (await post_signup(client, "again@example.com")).status == 201
    first = stored_check(db, "again@example.com")
    delete_user(db, "again@example.com")
    hunter.answer("again@example.com", verdict("invalid"))  # would refuse, if asked
    assert (await post_signup(client, "again@example.com")).status == 201
    assert stored_check(db, "again@example.com") == first
    assert len(hunter.calls) == 1


async def test_unchecked_results_are_not_cached(make_auth_client, hunter, db):
    hunter.answer("flaky@example.com", hunter_error(503), verdict("invalid"))
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    assert (await post_signup(client, "flaky@example.com")).status == 201
    assert stored_check(db, "flaky@example.com")["status"] == "unchecked"
    delete_user(db, "flaky@example.com")
    await assert_problem(await post_signup(client, "flaky@example.com"), 422, "email_undeliverable")
    assert len(hunter.calls) == 2


async def test_a_zero_ttl_caches_nothing(make_auth_client, hunter, db):
    hunter.answer("nocache@example.com", verdict("invalid"))
    client = await make_auth_client(hunter_base_url=hunter.url, email_check_cache_ttl=0, **FAST)
    for _ in range(2):
        await assert_problem(await post_signup(client, "nocache@example.com"), 422, "email_undeliverable")
    assert len(hunter.calls) == 2


async def test_without_redis_every_signup_asks_hunter(make_auth_client, hunter, db):
    hunter.answer("noredis@example.com", verdict("invalid"))
    client = await make_auth_client(
        hunter_base_url=hunter.url, redis_url=f"redis://127.0.0.1:{free_port()}/0", **FAST
    )
    for _ in range(2):
        await assert_problem(await post_signup(client, "noredis@example.com"), 422, "email_undeliverable")
    assert (await post_signup(client, "fine@example.com")).status == 201
    assert stored_check(db, "fine@example.com")["status"] == "valid"
    assert len(hunter.calls) == 3


# --- when Hunter is asked ----------------------------------------------------------------------------


async def test_without_a_key_nothing_is_checked(make_auth_client, hunter, db):
    hunter.answer("nokey@example.com", verdict("invalid"))
    client = await make_auth_client(hunter_base_url=hunter.url, hunter_api_key="")
    body = await post_signup(client, "nokey@example.com")
    assert body.status == 201, await body.text()
    token = (await body.json())["access_token"]
    assert stored_check(db, "nokey@example.com") is None
    me = await client.get(ME, headers={"Authorization": f"Bearer {token}"})
    assert (await me.json())["email_check"] is None
    assert hunter.calls == []


async def test_cheap_refusals_come_before_asking_hunter(make_auth_client, hunter, db):
    client = await make_auth_client(
        hunter_base_url=hunter.url, referral_service_url=f"http://127.0.0.1:{free_port()}", **FAST
    )
    assert (await post_signup(client, "taken@example.com")).status == 201
    await assert_problem(await post_signup(client, "TAKEN@example.com"), 409, "email_taken")
    response = await client.post(
        SIGNUP, json={"email": "coded@example.com", "password": "correct horse", "referral_code": "ABCD1234"}
    )
    await assert_problem(response, 503, "referral_service_unavailable")
    assert [call["email"] for call in hunter.calls] == ["taken@example.com"]


async def test_check_email_is_the_one_entry_point_for_every_signup_path(make_auth_client, hunter, db):
    """The provider-signup path calls AuthService.check_email: a record to store, or the 422."""
    hunter.answer("provider-bad@example.com", verdict("invalid"))
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    service = client.app[AUTH_SERVICE]
    record = await service.check_email("provider@example.com")
    assert record is not None and record["status"] == "valid" and record["source"] == "hunter"
    with pytest.raises(EmailUndeliverable):
        await service.check_email("provider-bad@example.com")
    assert user_count(db) == 0


# --- the key stays secret ----------------------------------------------------------------------------


async def test_the_api_key_never_reaches_logs_or_answers(make_auth_client, hunter, db, caplog):
    caplog.set_level(logging.DEBUG)
    hunter.answer("k1@example.com", hunter_error(401))
    hunter.answer("k2@example.com", (200, "<html>"))
    hunter.answer("k3@example.com", hunter_error(500))
    hunter.answer("k4@example.com", verdict("invalid"))
    texts = []
    client = await make_auth_client(hunter_base_url=hunter.url, **FAST)
    for n in (1, 2, 3, 4):
        response = await post_signup(client, f"k{n}@example.com")
        texts.append(await response.text())
        if response.status == 201:
            token = (await response.json())["access_token"]
            texts.append(await (await client.get(ME, headers={"Authorization": f"Bearer {token}"})).text())
    hunter.delay = 5.0
    slow = await make_auth_client(hunter_base_url=hunter.url, **{**FAST, "hunter_timeout": 0.2})
    texts.append(await (await post_signup(slow, "k5@example.com")).text())
    unreachable = await make_auth_client(hunter_base_url=f"http://127.0.0.1:{free_port()}", **FAST)
    texts.append(await (await post_signup(unreachable, "k6@example.com")).text())
    assert len(hunter.calls) == 5 and all(call["api_key"] == KEY for call in hunter.calls)
    formatter = JsonFormatter("auth")
    logged = [formatter.format(record) for record in caplog.records]
    assert any("email verification unavailable" in line for line in logged)
    assert not [line for line in logged if KEY in line]
    assert not [text for text in texts if KEY in text]
    with db.cursor() as cursor:
        cursor.execute("SELECT email_check::text FROM auth.users")
        assert not [row for row in cursor.fetchall() if KEY in row[0]]
    assert KEY not in repr(client.app[AUTH_SERVICE])
