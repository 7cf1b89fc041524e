"""Signup with a referral code across the two real services: the check, the link, the outbox, the tokens."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from services.auth.adapters.referral_client import ServiceToken
from services.auth.adapters.signing import AccessTokenIssuer, parse_key_ring
from tests.helpers import Mailbox
from tests.integration.conftest import eventually, new_email, referrals_in, users_with

PROBLEM = "application/problem+json"


async def problem(response: Any, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    assert (await response.json(content_type=None))["code"] == code


# --- the code check ------------------------------------------------------------------------------------


async def test_signup_with_a_valid_code_links_the_new_user(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    email = new_email("newbie")
    response = await cluster.signup(email, code.lower())  # codes are case-insensitive
    assert response.status == 201, await response.text()
    user = (await response.json())["user"]
    assert user["referrer_id"] == owner.id
    assert referrals_in(db, owner.id) == [(user["id"], code)]
    listed = await cluster.http.get(
        f"{cluster.referral_url}/api/v1/referral/referrers/{owner.id}/referrals", headers=owner.headers
    )
    assert listed.status == 200, await listed.text()
    page = await listed.json()
    assert page["total"] == 1
    assert [(i["referral_id"], i["email"]) for i in page["items"]] == [(user["id"], email)]
    # The new user's /me says the same.
    me = await cluster.http.get(
        f"{cluster.auth_url}/api/v1/auth/me",
        headers={"Authorization": f"Bearer {(await response.json())['access_token']}"},
    )
    assert (await me.json())["referrer_id"] == owner.id


async def test_unknown_code_is_404_and_creates_nobody(cluster, db):
    email = new_email("unknown")
    await problem(await cluster.signup(email, "NOSUCHCODE"), 404, "code_not_found")
    assert users_with(db, email) == 0


async def test_deleted_code_is_410_and_creates_nobody(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("deleter"))
    # Used once, so the referral service has the code cached when it is deleted.
    first = await cluster.signup(new_email("early"), code)
    assert first.status == 201, await first.text()
    deleted = await cluster.http.delete(
        f"{cluster.referral_url}/api/v1/referral/codes/me", headers=owner.headers
    )
    assert deleted.status == 204, await deleted.text()
    email = new_email("late")
    await problem(await cluster.signup(email, code), 410, "code_expired")
    assert users_with(db, email) == 0
    assert len(referrals_in(db, owner.id)) == 1


def expire_code(db: Any, owner_id: str) -> None:
    """Move the owner's code into the past, in the database only (as if its time had come)."""
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.codes SET created_at = now() - interval '2 s',"
            " expires_at = now() - interval '1 s' WHERE owner_id = %s",
            (owner_id,),
        )
        assert cursor.rowcount == 1


def forget_cached_codes(redis_url: str, redis_prefix: str) -> None:
    """Drop the referral service's cached codes: an expiry written behind its back is not in them."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{redis_prefix}ref:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def test_expired_code_is_410_and_creates_nobody(cluster, db, redis_url, redis_prefix):
    owner, code = await cluster.referrer_with_code(new_email("expirer"))
    expire_code(db, owner.id)
    # Creating the code cached it with its real expiry; the one written above is only in the database.
    forget_cached_codes(redis_url, redis_prefix)
    email = new_email("late")
    await problem(await cluster.signup(email, code), 410, "code_expired")
    assert users_with(db, email) == 0


async def test_referral_service_down_during_the_check_is_503_and_creates_nobody(cluster, db):
    _, code = await cluster.referrer_with_code(new_email("owner"))
    await cluster.stop_referral()
    email = new_email("blocked")
    response = await cluster.signup(email, code)
    await problem(response, 503, "referral_service_unavailable")
    assert response.headers["Retry-After"].isdigit()
    assert users_with(db, email) == 0
    # Without a code, signing up does not need the referral service.
    assert (await cluster.signup(new_email("plain"))).status == 201
    await cluster.start_referral()
    assert (await cluster.signup(email, code)).status == 201


# --- the outbox ----------------------------------------------------------------------------------------


async def test_referral_service_stopped_after_the_check_the_link_arrives_when_it_is_back(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))

    async def stop(_: str) -> None:
        await cluster.stop_referral()

    cluster.hop.after_code_ok = stop
    response = await cluster.signup(new_email("during"), code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    assert cluster.referral is None
    await eventually(lambda: outbox_attempts(db, "referral_outbox", user_id) >= 2)  # relays that failed
    assert referrals_in(db, owner.id) == []
    await cluster.start_referral()
    await eventually(lambda: referrals_in(db, owner.id) == [(user_id, code)])
    created = [status for rid, status in cluster.hop.link_answers if rid == user_id and status in (200, 201)]
    assert created == [201], cluster.hop.link_answers


async def test_signups_while_the_referral_service_restarts_all_arrive_once(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))

    async def one(n: int) -> tuple[str, int, str | None]:
        email = new_email(f"burst{n}")
        response = await cluster.signup(email, code)
        body = await response.json(content_type=None)
        return email, response.status, body.get("user", {}).get("id")

    burst = asyncio.gather(*(one(n) for n in range(12)))
    await asyncio.sleep(0.05)
    await cluster.stop_referral()
    results = await burst
    await asyncio.sleep(0.3)
    await cluster.start_referral()
    assert {status for _, status, _ in results} <= {201, 503}, results
    accepted = sorted(user_id for _, status, user_id in results if status == 201)
    for email, status, _ in results:
        assert users_with(db, email) == (1 if status == 201 else 0)
    # Each link is recorded exactly once: one row per accepted signup...
    await eventually(lambda: sorted(rid for rid, _ in referrals_in(db, owner.id)) == accepted)
    # ...and the service never created one twice. Its first answer may be lost on the way (a delivery
    # that timed out while the service stopped, after its commit): the retry then answers 200,
    # "already recorded" (as in the lost-answer test below).
    answers: dict[str, list[int]] = {rid: [] for rid in accepted}
    for rid, status in cluster.hop.link_answers:
        answers.setdefault(rid, []).append(status)
    assert set(answers) == set(accepted), answers
    for rid, statuses in answers.items():
        assert statuses.count(201) <= 1, (rid, statuses)
        assert {200, 201} & set(statuses), (rid, statuses)
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.referral_outbox WHERE delivered_at IS NULL")
        assert cursor.fetchone() == (0,)


async def test_a_delivery_retried_after_a_lost_answer_is_not_duplicated(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    cluster.hop.lose_link_answers = 1
    response = await cluster.signup(new_email("lost"), code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]

    def delivered() -> bool:
        with db.cursor() as cursor:
            cursor.execute(
                "SELECT delivered_at IS NOT NULL FROM auth.referral_outbox WHERE referral_id = %s", (user_id,)
            )
            return bool(cursor.fetchone()[0])

    await eventually(delivered)
    assert cluster.hop.link_answers == [(user_id, 201), (user_id, 200)]
    assert referrals_in(db, owner.id) == [(user_id, code)]


async def test_a_code_expiring_before_delivery_still_yields_the_link(cluster, db, redis_url, redis_prefix):
    owner, code = await cluster.referrer_with_code(new_email("owner"))

    async def expire_and_go_down(_: str) -> None:
        expire_code(db, owner.id)
        await cluster.stop_referral()

    cluster.hop.after_code_ok = expire_and_go_down
    response = await cluster.signup(new_email("inwindow"), code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    forget_cached_codes(redis_url, redis_prefix)
    await cluster.start_referral()
    # The code is dead for new signups...
    await problem(await cluster.signup(new_email("after"), code), 410, "code_expired")
    # ...but the signup accepted while it lived gets its link.
    await eventually(lambda: referrals_in(db, owner.id) == [(user_id, code)])


async def test_a_code_deleted_before_delivery_still_yields_the_link(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))

    async def delete(_: str) -> None:
        deleted = await cluster.http.delete(
            f"{cluster.referral_url}/api/v1/referral/codes/me", headers=owner.headers
        )
        assert deleted.status == 204

    cluster.hop.after_code_ok = delete
    response = await cluster.signup(new_email("inwindow"), code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    await eventually(lambda: referrals_in(db, owner.id) == [(user_id, code)])


# --- tokens between the services -----------------------------------------------------------------------


def service_token(cluster: Any, signing_pem: str) -> str:
    settings = cluster.auth_settings
    issuer = AccessTokenIssuer(
        parse_key_ring(signing_pem), issuer=settings.issuer, audience=settings.token_audience, ttl=900
    )
    return ServiceToken(issuer, audience=settings.referral_audience).bearer()


async def test_a_users_token_is_refused_by_the_internal_endpoints(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    other = await cluster.user(new_email("other"))
    check = await cluster.http.get(f"{cluster.referral_url}/internal/v1/codes/{code}", headers=owner.headers)
    assert check.status in (401, 403), await check.text()
    link = await cluster.http.post(
        f"{cluster.referral_url}/internal/v1/referrals",
        json={"referral_id": other.id, "referrer_id": owner.id, "referral_email": other.email, "code": code},
        headers=other.headers,
    )
    assert link.status in (401, 403), await link.text()
    assert referrals_in(db, owner.id) == []


async def test_the_service_token_opens_the_internal_endpoints_only(cluster, db, signing_pem):
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    headers = {"Authorization": f"Bearer {service_token(cluster, signing_pem)}"}
    check = await cluster.http.get(f"{cluster.referral_url}/internal/v1/codes/{code}", headers=headers)
    assert check.status == 200, await check.text()
    assert (await check.json())["owner_id"] == owner.id
    for method, path in [
        ("GET", "/api/v1/referral/codes/me"),
        ("DELETE", "/api/v1/referral/codes/me"),
        ("POST", "/api/v1/referral/referrals"),
        ("GET", f"/api/v1/referral/referrers/{owner.id}/referrals"),
    ]:
        kwargs: dict[str, Any] = {"json": {"code": code}} if method == "POST" else {}
        response = await cluster.http.request(method, cluster.referral_url + path, headers=headers, **kwargs)
        assert response.status == 401, (method, path, response.status, await response.text())
    # And the auth service's own user endpoint refuses it too.
    me = await cluster.http.get(f"{cluster.auth_url}/api/v1/auth/me", headers=headers)
    assert me.status == 401


def outbox_attempts(db: Any, table: str, user_id: str) -> int:
    """The delivery attempts so far of the auth service's outbox row about `user_id` (0: none yet)."""
    column = "referral_id" if table == "referral_outbox" else "user_id"
    with db.cursor() as cursor:
        cursor.execute(f"SELECT attempts FROM auth.{table} WHERE {column} = %s", (user_id,))
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def link_status(db: Any, referral_id: str) -> str | None:
    with db.cursor() as cursor:
        cursor.execute("SELECT status FROM referral.referrals WHERE referral_id = %s", (referral_id,))
        row = cursor.fetchone()
    return row[0] if row else None


async def test_a_pending_link_is_confirmed_when_the_referral_verifies_even_with_the_service_down(
    cluster, db, smtp
):
    """The referral service is down when the user proves the address: the notice waits in the auth
    service's outbox and confirms the link once the service is back."""
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    mailbox = Mailbox(smtp.mail_dir)
    email = new_email("later")
    response = await cluster.signup(email, code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    await eventually(lambda: link_status(db, user_id) == "pending")
    await cluster.stop_referral()
    proof = await mailbox.token(email, "verify-email")
    verified = await cluster.post(cluster.auth_url + "/api/v1/auth/email/verify", json={"token": proof})
    assert verified.status == 200, await verified.text()
    await eventually(lambda: outbox_attempts(db, "verified_outbox", user_id) >= 2)  # relays that failed
    assert link_status(db, user_id) == "pending"
    await cluster.start_referral()
    await eventually(lambda: link_status(db, user_id) == "confirmed")
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT total, confirmed FROM referral.referrer_totals WHERE referrer_id = %s", (owner.id,)
        )
        assert cursor.fetchone() == (1, 1)
