"""Sessions and the data export (API.md "Data rights"), with both services running: the live logins
and what each records, ending one, and an export checked field by field, with the referral service
up and down."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.auth.oauth.helpers import oidc_settings, running_mock_provider, sign_in_at_provider
from tests.helpers import User
from tests.integration.conftest import eventually, new_email, referrals_in

SESSIONS = "/api/v1/auth/sessions"
EXPORT = "/api/v1/auth/me/export"
TOKEN = "/api/v1/auth/token"
AUTHORIZE = "/api/v1/auth/oauth/mock/authorize"
CALLBACK = "/api/v1/auth/oauth/mock/callback"
CODES = "/api/v1/referral/codes"
PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_mock_provider(tmp_path_factory.mktemp("oidc") / "provider.log") as running:
        yield running


@pytest.fixture
def auth_settings(auth_settings: Any, provider: Any) -> Any:
    """The cluster's auth service, with the mock provider configured."""
    return replace(auth_settings, oauth=(oidc_settings(provider.issuer),))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(cluster: Any, email: str, agent: str) -> dict[str, Any]:
    form = {"grant_type": "password", "username": email, "password": PASSWORD}
    response = await cluster.post(cluster.auth_url + TOKEN, data=form, headers={"User-Agent": agent})
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def refresh(cluster: Any, token: str, agent: str) -> Any:
    form = {"grant_type": "refresh_token", "refresh_token": token}
    return await cluster.post(cluster.auth_url + TOKEN, data=form, headers={"User-Agent": agent})


async def sessions(cluster: Any, access_token: str) -> list[dict[str, Any]]:
    async with cluster.http.get(cluster.auth_url + SESSIONS, headers=bearer(access_token)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        return list((await response.json())["items"])


async def end(cluster: Any, headers: dict[str, str], session_id: str) -> Any:
    async with cluster.http.delete(f"{cluster.auth_url}{SESSIONS}/{session_id}", headers=headers) as response:
        await response.read()
        return response


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def db_time(db: Any, sql: str, *params: Any) -> Any:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0] if row else None


# --- sessions ------------------------------------------------------------------------------------------


async def test_two_logins_are_two_sessions_each_token_marking_its_own(cluster: Any) -> None:
    email = new_email("two-logins")
    signup = await cluster.signup(email)
    assert signup.status == 201
    laptop = await login(cluster, email, "Laptop/1.0")
    phone = await login(cluster, email, "Phone/2.0 (Android)")

    seen_by_phone = await sessions(cluster, phone["access_token"])
    assert len(seen_by_phone) == 3  # the signup's login, the laptop's, the phone's
    assert [s["user_agent"] for s in seen_by_phone[:2]] == ["Phone/2.0 (Android)", "Laptop/1.0"]
    assert [s["current"] for s in seen_by_phone] == [True, False, False]
    for item in seen_by_phone:
        assert set(item) == {"id", "created_at", "last_used_at", "user_agent", "address", "current"}
        assert item["address"] == "127.0.0.1"
        assert item["created_at"] == item["last_used_at"]
        uuid.UUID(item["id"])

    seen_by_laptop = await sessions(cluster, laptop["access_token"])
    assert [s["id"] for s in seen_by_laptop] == [s["id"] for s in seen_by_phone]
    assert [s["current"] for s in seen_by_laptop] == [False, True, False]


async def test_a_refresh_moves_last_used_at_and_records_its_client(cluster: Any, db: Any) -> None:
    email = new_email("refresher")
    assert (await cluster.signup(email)).status == 201
    laptop = await login(cluster, email, "Laptop/1.0")
    [before] = [s for s in await sessions(cluster, laptop["access_token"]) if s["current"]]
    # Move the login back in time so the refresh's later moment shows whatever the clock's resolution.
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE auth.refresh_tokens SET created_at = created_at - interval '1 hour',"
            " login_at = login_at - interval '1 hour' WHERE family_id = %s",
            (before["id"],),
        )
    refreshed = await refresh(cluster, laptop["refresh_token"], "Laptop/1.1")
    assert refreshed.status == 200, await refreshed.text()
    new_access = (await refreshed.json())["access_token"]

    [after] = [s for s in await sessions(cluster, new_access) if s["current"]]
    assert after["id"] == before["id"], "a refresh stays in its session (the new token's sid is the same)"
    assert at(after["created_at"]) == at(before["created_at"]) - timedelta(hours=1)
    assert at(after["last_used_at"]) > at(after["created_at"]) + timedelta(minutes=59)
    assert after["user_agent"] == "Laptop/1.1"


async def test_ending_a_session_revokes_its_refresh_token_and_only_its_own(cluster: Any) -> None:
    email = new_email("ender")
    assert (await cluster.signup(email)).status == 201
    laptop = await login(cluster, email, "Laptop/1.0")
    phone = await login(cluster, email, "Phone/2.0")
    [laptop_session] = [s["id"] for s in await sessions(cluster, laptop["access_token"]) if s["current"]]

    stranger = await cluster.user(new_email("stranger"), verified=False)
    refused = await end(cluster, stranger.headers, laptop_session)
    assert refused.status == 404
    assert (await refused.json())["code"] == "session_not_found"

    ended = await end(cluster, bearer(phone["access_token"]), laptop_session)
    assert ended.status == 204
    gone = await refresh(cluster, laptop["refresh_token"], "Laptop/1.0")
    assert gone.status == 400
    assert (await gone.json())["error"] == "invalid_grant"
    still = await refresh(cluster, phone["refresh_token"], "Phone/2.0")
    assert still.status == 200, "the other session still refreshes"
    assert laptop_session not in [s["id"] for s in await sessions(cluster, phone["access_token"])]

    for missing in (laptop_session, str(uuid.uuid4()), "not-a-uuid"):
        answer = await end(cluster, bearer(phone["access_token"]), missing)
        assert answer.status == 404, missing
        assert (await answer.json())["code"] == "session_not_found"


# --- the export ----------------------------------------------------------------------------------------


async def provider_sign_in(cluster: Any, sub: str, email: str, agent: str, **query: str) -> Any:
    async with cluster.http.get(
        cluster.auth_url + AUTHORIZE, params=query, allow_redirects=False
    ) as response:
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
    code, state = await sign_in_at_provider(
        cluster.http, location, sub, {"email": email, "email_verified": True}
    )
    async with cluster.http.get(
        cluster.auth_url + CALLBACK, params={"code": code, "state": state}, headers={"User-Agent": agent}
    ) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def create_code(cluster: Any, token: str, **fields: Any) -> dict[str, Any]:
    body = {"expires_at": (datetime.now(UTC) + timedelta(days=3)).isoformat(), **fields}
    response = await cluster.post(cluster.referral_url + CODES, json=body, headers=bearer(token))
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def test_the_export_holds_everything_both_services_keep(cluster: Any, db: Any) -> None:
    referrer, referrer_code = await cluster.referrer_with_code(new_email("referrer"))
    email = new_email("exported")
    signed_in = await provider_sign_in(cluster, "sub-export", email, "Browser/9", referral_code=referrer_code)
    me = signed_in["user"]
    token = signed_in["access_token"]
    await eventually(lambda: referrals_in(db, referrer.id) == [(me["id"], referrer_code)])

    deleted = await create_code(cluster, token, code="OLDCODE1")
    async with cluster.http.delete(cluster.referral_url + CODES + "/me", headers=bearer(token)) as response:
        assert response.status == 204
    active = await create_code(cluster, token, code="NEWCODE2", max_uses=5)
    pending_email = new_email("pending-referral")
    pending = await cluster.signup(pending_email, "NEWCODE2")
    assert pending.status == 201
    pending_id = (await pending.json())["user"]["id"]
    confirmed_user: User = await cluster.user(new_email("confirmed-referral"))
    activated = await cluster.post(
        cluster.referral_url + "/api/v1/referral/referrals",
        json={"code": "newcode2"},
        headers=confirmed_user.headers,
    )
    assert activated.status == 201, await activated.text()
    await eventually(lambda: len(referrals_in(db, me["id"])) == 2)
    # The provider vouched for the address: the referral service is told (over the outbox).
    verified_sql = "SELECT verified_at FROM referral.verified_users WHERE user_id = %s"
    await eventually(lambda: db_time(db, verified_sql, me["id"]) is not None)

    async with cluster.http.get(cluster.auth_url + EXPORT, headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        export = await response.json()

    assert set(export) == {
        "exported_at", "account", "identities", "email_check", "profile", "sessions", "codes", "referrer",
        "referrals",
    }  # fmt: skip
    assert abs(at(export["exported_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    account = export["account"]
    created_at = db_time(db, "SELECT created_at FROM auth.users WHERE id = %s", me["id"])
    assert account == {
        "id": me["id"],
        "email": email,
        "email_verified": True,
        "created_at": created_at.isoformat(),
        "referrer_id": referrer.id,
        "has_password": False,
        "email_verified_at": db_time(db, verified_sql, me["id"]).isoformat(),
    }
    identity_at = db_time(db, "SELECT created_at FROM auth.identities WHERE user_id = %s", me["id"])
    assert export["identities"] == [
        {"provider": "mock", "subject": "sub-export", "email": email, "created_at": identity_at.isoformat()}
    ]
    assert export["email_check"] is None and export["profile"] is None

    assert [(s["user_agent"], s["current"]) for s in export["sessions"]] == [("Browser/9", True)]

    old, new = export["codes"]
    deleted_at = db_time(db, "SELECT deleted_at FROM referral.codes WHERE code = 'OLDCODE1'")
    assert old == {
        "code": "OLDCODE1",
        "status": "deleted",
        "created_at": at(deleted["created_at"]).isoformat(),
        "expires_at": at(deleted["expires_at"]).isoformat(),
        "deleted_at": deleted_at.isoformat(),
        "max_uses": None,
        "uses": 0,
    }
    assert new == {
        "code": "NEWCODE2",
        "status": "active",
        "created_at": at(active["created_at"]).isoformat(),
        "expires_at": at(active["expires_at"]).isoformat(),
        "deleted_at": None,
        "max_uses": 5,
        "uses": 2,
    }

    link_sql = "SELECT created_at, confirmed_at FROM referral.referrals WHERE referral_id = %s"

    def link_times(user_id: str) -> tuple[Any, Any]:
        with db.cursor() as cursor:
            cursor.execute(link_sql, (user_id,))
            created, confirmed = cursor.fetchone()
        return created.isoformat(), confirmed.isoformat() if confirmed else None

    my_link_at, my_confirmed_at = link_times(me["id"])
    assert my_confirmed_at is not None, "the provider vouched for the address: the link is confirmed"
    assert export["referrer"] == {
        "referrer_id": referrer.id,
        "referral_id": me["id"],
        "email": email,
        "code": referrer_code,
        "status": "confirmed",
        "created_at": my_link_at,
        "confirmed_at": my_confirmed_at,
    }
    pending_at, _ = link_times(pending_id)
    confirmed_at, confirmed_confirmed_at = link_times(confirmed_user.id)
    assert export["referrals"] == [
        {
            "referrer_id": me["id"],
            "referral_id": pending_id,
            "email": pending_email,
            "code": "NEWCODE2",
            "status": "pending",
            "created_at": pending_at,
            "confirmed_at": None,
        },
        {
            "referrer_id": me["id"],
            "referral_id": confirmed_user.id,
            "email": confirmed_user.email,
            "code": "NEWCODE2",
            "status": "confirmed",
            "created_at": confirmed_at,
            "confirmed_at": confirmed_confirmed_at,
        },
    ]
    text = str(export)
    for secret in (signed_in["refresh_token"], token, "password_hash", "token_hash", "$argon2"):
        assert secret not in text


async def test_the_export_answers_503_while_the_referral_service_is_down(cluster: Any) -> None:
    user = await cluster.user(new_email("while-down"), verified=False)
    await cluster.stop_referral()
    async with cluster.http.get(cluster.auth_url + EXPORT, headers=user.headers) as response:
        assert response.status == 503, await response.text()
        assert response.content_type == "application/problem+json"
        assert response.headers["Retry-After"]
        problem = await response.json()
    assert problem["code"] == "referral_service_unavailable"
    await cluster.start_referral()
    async with cluster.http.get(cluster.auth_url + EXPORT, headers=user.headers) as response:
        assert response.status == 200, "the same export works again once the referral service is back"
