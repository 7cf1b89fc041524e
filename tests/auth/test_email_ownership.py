"""Proving an address and recovering an account (API.md, "Email ownership, recovery and sessions"):
verification and reset mails sent over real SMTP (the tests read what the server received), single-use
tokens, password change, signing out everywhere, and the per-address limits on mails."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import redis

from deploy.local.embedded import start_smtp
from deploy.local.processes import free_port
from tests.helpers import (
    Mailbox,
    assert_problem,
    password_login,
    signup,
    text_of,
    verify_email,
)

VERIFY = "/api/v1/auth/email/verify"
VERIFICATION = "/api/v1/auth/email/verification"
FORGOT = "/api/v1/auth/password/forgot"
RESET = "/api/v1/auth/password/reset"
CHANGE = "/api/v1/auth/password/change"
SESSIONS = "/api/v1/auth/sessions"
ME = "/api/v1/auth/me"
TOKEN = "/api/v1/auth/token"
PAGES = "http://127.0.0.1:8080/api/v1/auth/pages"  # AUTH_PUBLIC_BASE_URL's default + the pages


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def me(client: Any, token: str) -> dict[str, Any]:
    response = await client.get(ME, headers=bearer(token))
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def refresh(client: Any, refresh_token: str) -> Any:
    return await client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": refresh_token})


def query_one(db: Any, sql: str, *params: Any) -> Any:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


# --- verification ----------------------------------------------------------------------------------


async def test_signup_mails_a_verification_link_whose_token_is_kept_only_as_a_digest(
    auth_client, mailbox, db
):
    await signup(auth_client, "vera@example.com")
    [mail] = await mailbox.wait_for("vera@example.com")
    assert mail["Subject"] == "Confirm your email address"
    assert mail.get_body(preferencelist=("html",)) is not None
    token = await mailbox.token("vera@example.com", "verify-email")
    assert f"{PAGES}/verify-email#token={token}" in text_of(mail)
    assert len(token) >= 43  # 256 bits, base64url
    digest = hashlib.sha256(token.encode()).digest()
    assert query_one(db, "SELECT count(*) FROM auth.mail_tokens WHERE token_hash = %s", digest) == (1,)
    assert query_one(db, "SELECT count(*) FROM auth.mail_tokens WHERE token_hash = %s", token.encode()) == (
        0,
    )

    async def link_cleared() -> bool:
        row = query_one(
            db, "SELECT link, delivered_at FROM auth.mail_outbox WHERE recipient = %s", "vera@example.com"
        )
        return row[0] is None and row[1] is not None

    for _ in range(100):
        if await link_cleared():
            break
        await asyncio.sleep(0.02)
    assert await link_cleared(), "a sent mail's row keeps no live link"


async def test_the_link_proves_the_address_once(auth_client, mailbox):
    body = await signup(auth_client, "ida@example.com")
    assert body["user"]["email_verified"] is False
    token = await mailbox.token("ida@example.com", "verify-email")
    response = await auth_client.post(VERIFY, json={"token": token})
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    verified = await response.json()
    assert verified["user"]["id"] == body["user"]["id"]
    assert verified["user"]["email_verified"] is True
    assert (await me(auth_client, body["access_token"]))["email_verified"] is True
    await assert_problem(await auth_client.post(VERIFY, json={"token": token}), 400, "verification_invalid")
    # A new login's token says so too.
    granted = await password_login(auth_client, "ida@example.com")
    assert granted.status == 200


@pytest.mark.parametrize("token", ["x" * 43, "not-a-token-at-all-but-long-enough", "A" * 256])
async def test_an_unknown_token_is_verification_invalid(auth_client, token):
    await assert_problem(await auth_client.post(VERIFY, json={"token": token}), 400, "verification_invalid")


async def test_an_expired_link_is_verification_expired(auth_client, mailbox, db):
    await signup(auth_client, "old@example.com")
    token = await mailbox.token("old@example.com", "verify-email")
    with db.cursor() as cursor:
        cursor.execute("UPDATE auth.mail_tokens SET expires_at = now() - interval '1 second'")
    await assert_problem(await auth_client.post(VERIFY, json={"token": token}), 410, "verification_expired")


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": 5}, {"token": "short"}, {"token": "x" * 300}])
async def test_verify_validation(auth_client, body):
    await assert_problem(await auth_client.post(VERIFY, json=body), 422, "validation_failed")


async def test_a_new_verification_mail_at_most_once_a_minute(auth_client, mailbox):
    body = await signup(auth_client, "nina@example.com")
    await mailbox.wait_for("nina@example.com")
    # The signup's own mail counts: asking again at once is too soon.
    again = await auth_client.post(VERIFICATION, headers=bearer(body["access_token"]))
    problem = await assert_problem(again, 429, "too_many_mails")
    assert 1 <= int(again.headers["Retry-After"]) <= 60, problem
    assert len(mailbox.to("nina@example.com")) == 1


async def test_a_new_verification_mail_is_sent_and_both_links_work_until_one_is_used(
    make_auth_client, mailbox, redis_url, redis_prefix
):
    client = await make_auth_client()
    body = await signup(client, "otto@example.com")
    first = await mailbox.token("otto@example.com", "verify-email")
    _forget_mail_limits(redis_url, redis_prefix)
    response = await client.post(VERIFICATION, headers=bearer(body["access_token"]))
    assert response.status == 202, await response.text()
    await mailbox.wait_for("otto@example.com", count=2)
    second = await mailbox.token("otto@example.com", "verify-email")
    assert second != first
    assert (await client.post(VERIFY, json={"token": first})).status == 200
    # Proven now: no more verification mails.
    again = await client.post(VERIFICATION, headers=bearer(body["access_token"]))
    await assert_problem(again, 409, "email_already_verified")


async def test_asking_for_a_verification_mail_needs_a_token(auth_client):
    response = await auth_client.post(VERIFICATION)
    assert response.status == 401


def _forget_mail_limits(redis_url: str, prefix: str) -> None:
    """As if a day had passed for the per-address mail limits."""
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}mail-limit:*"):
            client.delete(key)
    finally:
        client.close()


# --- reset -----------------------------------------------------------------------------------------


async def test_forgot_answers_the_same_whether_or_not_an_account_exists(auth_client, mailbox):
    await signup(auth_client, "rita@example.com")
    await mailbox.wait_for("rita@example.com")
    known = await auth_client.post(FORGOT, json={"email": " Rita@Example.com "})
    unknown = await auth_client.post(FORGOT, json={"email": "nobody-here@example.com"})
    assert known.status == unknown.status == 202
    assert await known.read() == await unknown.read() == b""
    [_, reset] = await mailbox.wait_for("rita@example.com", count=2)
    assert reset["Subject"] == "Reset your password"
    await asyncio.sleep(0.3)
    assert mailbox.to("nobody-here@example.com") == []
    # The limit counts requests per address, whether or not an account has it: no oracle either.
    for email in ("rita@example.com", "nobody-here@example.com"):
        again = await auth_client.post(FORGOT, json={"email": email})
        await assert_problem(again, 429, "too_many_mails")


async def test_a_reset_sets_the_password_proves_the_address_and_signs_out_everywhere_else(
    auth_client, mailbox
):
    old = await signup(auth_client, "sam@example.com", "old password")
    other_login = await (await password_login(auth_client, "sam@example.com", "old password")).json()
    assert (await auth_client.post(FORGOT, json={"email": "sam@example.com"})).status == 202
    token = await mailbox.token("sam@example.com", "reset-password")
    response = await auth_client.post(RESET, json={"token": token, "password": "new password!"})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"user", "access_token", "refresh_token", "token_type", "expires_in"}
    assert body["user"]["email_verified"] is True  # the mail reached its owner
    assert (await me(auth_client, body["access_token"]))["email_verified"] is True
    assert (await password_login(auth_client, "sam@example.com", "old password")).status == 400
    assert (await password_login(auth_client, "sam@example.com", "new password!")).status == 200
    for earlier in (old["refresh_token"], other_login["refresh_token"]):
        assert (await refresh(auth_client, earlier)).status == 400
    assert (await refresh(auth_client, body["refresh_token"])).status == 200
    # Once only.
    again = await auth_client.post(RESET, json={"token": token, "password": "another one"})
    await assert_problem(again, 400, "reset_invalid")


async def test_a_newer_reset_mail_and_a_password_change_void_the_older_links(
    auth_client, mailbox, redis_url, redis_prefix
):
    body = await signup(auth_client, "tom@example.com")
    await auth_client.post(FORGOT, json={"email": "tom@example.com"})
    first = await mailbox.token("tom@example.com", "reset-password")
    _forget_mail_limits(redis_url, redis_prefix)
    await auth_client.post(FORGOT, json={"email": "tom@example.com"})
    await mailbox.wait_for("tom@example.com", count=3)
    second = await mailbox.token("tom@example.com", "reset-password")
    await assert_problem(
        await auth_client.post(RESET, json={"token": first, "password": "new password!"}),
        400,
        "reset_invalid",
    )
    changed = await auth_client.post(
        CHANGE,
        json={"current_password": "correct horse", "new_password": "changed password"},
        headers=bearer(body["access_token"]),
    )
    assert changed.status == 204, await changed.text()
    await assert_problem(
        await auth_client.post(RESET, json={"token": second, "password": "new password!"}),
        400,
        "reset_invalid",
    )


async def test_an_expired_reset_link_is_reset_expired(auth_client, mailbox, db):
    await signup(auth_client, "una@example.com")
    await auth_client.post(FORGOT, json={"email": "una@example.com"})
    token = await mailbox.token("una@example.com", "reset-password")
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE auth.mail_tokens SET expires_at = now() - interval '1 second'"
            " WHERE purpose = 'reset_password'"
        )
    response = await auth_client.post(RESET, json={"token": token, "password": "new password!"})
    await assert_problem(response, 410, "reset_expired")
    # A verification token is no reset token, and the other way round.
    verify_token = await mailbox.token("una@example.com", "verify-email")
    response = await auth_client.post(RESET, json={"token": verify_token, "password": "new password!"})
    await assert_problem(response, 400, "reset_invalid")


async def test_a_reset_clears_the_login_throttle_of_the_account(auth_client, mailbox):
    await signup(auth_client, "vic@example.com")
    headers = {"X-Forwarded-For": "203.0.113.40"}
    form = {"grant_type": "password", "username": "vic@example.com", "password": "bad guess"}
    for _ in range(5):
        assert (await auth_client.post(TOKEN, data=form, headers=headers)).status == 400
    assert (await auth_client.post(TOKEN, data=form, headers=headers)).status == 429
    await auth_client.post(FORGOT, json={"email": "vic@example.com"})
    token = await mailbox.token("vic@example.com", "reset-password")
    assert (await auth_client.post(RESET, json={"token": token, "password": "new password!"})).status == 200
    right = {**form, "password": "new password!"}
    assert (await auth_client.post(TOKEN, data=right, headers=headers)).status == 200


async def test_an_account_without_a_password_gets_a_reset_mail_too(auth_client, mailbox, db):
    await signup(auth_client, "pia@example.com")
    with db.cursor() as cursor:
        cursor.execute("UPDATE auth.users SET password_hash = NULL WHERE email = 'pia@example.com'")
    assert (await auth_client.post(FORGOT, json={"email": "pia@example.com"})).status == 202
    token = await mailbox.token("pia@example.com", "reset-password")
    assert (await auth_client.post(RESET, json={"token": token, "password": "first password"})).status == 200
    assert (await password_login(auth_client, "pia@example.com", "first password")).status == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"email": "not an email"}, {"email": "x" * 250 + "@example.com"}],
)
async def test_forgot_validation(auth_client, body):
    await assert_problem(await auth_client.post(FORGOT, json=body), 422, "validation_failed")


@pytest.mark.parametrize(
    "body", [{"token": "x" * 43}, {"token": "x" * 43, "password": "short"}, {"password": "long enough"}]
)
async def test_reset_validation(auth_client, body):
    await assert_problem(await auth_client.post(RESET, json=body), 422, "validation_failed")


# --- change, sign out everywhere -------------------------------------------------------------------


async def test_a_password_change_keeps_the_caller_signed_in_and_nobody_else(auth_client):
    first = await signup(auth_client, "walt@example.com")
    second = await (await password_login(auth_client, "walt@example.com")).json()
    response = await auth_client.post(
        CHANGE,
        json={"current_password": "correct horse", "new_password": "new password!"},
        headers=bearer(second["access_token"]),
    )
    assert response.status == 204, await response.text()
    assert (await refresh(auth_client, first["refresh_token"])).status == 400
    assert (await refresh(auth_client, second["refresh_token"])).status == 200
    assert (await password_login(auth_client, "walt@example.com", "new password!")).status == 200


async def test_a_wrong_current_password_counts_as_a_failed_login(auth_client):
    body = await signup(auth_client, "xena@example.com")
    wrong = {"current_password": "not it", "new_password": "new password!"}
    for _ in range(5):
        response = await auth_client.post(CHANGE, json=wrong, headers=bearer(body["access_token"]))
        await assert_problem(response, 403, "wrong_password")
    response = await auth_client.post(CHANGE, json=wrong, headers=bearer(body["access_token"]))
    await assert_problem(response, 429, "too_many_requests")
    assert response.headers["Retry-After"]
    assert (await password_login(auth_client, "xena@example.com")).status == 429  # the same counter


async def test_sign_out_everywhere_revokes_every_login(auth_client):
    first = await signup(auth_client, "yann@example.com")
    second = await (await password_login(auth_client, "yann@example.com")).json()
    response = await auth_client.delete(SESSIONS, headers=bearer(first["access_token"]))
    assert response.status == 204
    for body in (first, second):
        assert (await refresh(auth_client, body["refresh_token"])).status == 400
    assert (await auth_client.delete(SESSIONS)).status == 401


# --- the mail server down, a restart ----------------------------------------------------------------


async def test_mails_queued_while_the_mail_server_is_down_all_arrive_when_it_is_back(
    make_auth_client, tmp_path: Path
):
    port = free_port()
    client = await make_auth_client(
        smtp_url=f"smtp://127.0.0.1:{port}?starttls=off", outbox_max_backoff=0.5, smtp_timeout=1.0
    )
    emails = [f"down{n}@example.com" for n in range(3)]
    for email in emails:
        response = await client.post(
            "/api/v1/auth/signup", json={"email": email, "password": "correct horse"}
        )
        assert response.status == 201  # the signup never waits for the mail server
    await asyncio.sleep(0.5)  # a few failed attempts
    with start_smtp(tmp_path / "mail", port=port) as server:
        box = Mailbox(server.mail_dir)
        for email in emails:
            await box.wait_for(email, timeout=10)


async def test_the_outbox_outlives_a_restart(make_auth_client, tmp_path: Path):
    port = free_port()
    settings = {"smtp_url": f"smtp://127.0.0.1:{port}?starttls=off", "outbox_max_backoff": 0.5}
    before = await make_auth_client(**settings)
    response = await before.post(
        "/api/v1/auth/signup", json={"email": "kept@example.com", "password": "correct horse"}
    )
    assert response.status == 201
    await before.close()
    with start_smtp(tmp_path / "mail", port=port) as server:
        box = Mailbox(server.mail_dir)
        await make_auth_client(**settings)
        [mail] = await box.wait_for("kept@example.com")
        assert re.search(r"/verify-email#token=", text_of(mail))


# --- the pages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "needle"),
    [
        ("verify-email", "text/html", b'<script src="pages.js" defer>'),
        ("reset-password", "text/html", b'type="password"'),
        ("pages.js", "text/javascript", b"location.hash"),
        ("pages.css", "text/css", b"body"),
    ],
)
async def test_the_pages_mail_links_open(auth_client, name, kind, needle):
    response = await auth_client.get(f"/api/v1/auth/pages/{name}")
    assert response.status == 200
    assert response.content_type == kind
    assert needle in await response.read()
    assert b"<script>" not in await response.read()  # no inline script: the gateway's CSP allows none


async def test_an_unknown_page_is_404(auth_client):
    assert (await auth_client.get("/api/v1/auth/pages/secrets")).status == 404


async def test_the_verify_helper_proves_an_address(auth_client, mailbox):
    """The shared test helper (tests/helpers.py) does what an owner does."""
    await signup(auth_client, "zed@example.com")
    body = await verify_email(auth_client, mailbox, "zed@example.com")
    assert body["user"]["email_verified"] is True
