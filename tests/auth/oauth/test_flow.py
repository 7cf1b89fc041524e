"""The whole provider sign-in through the auth API, browser-less, against a real OpenID Connect provider."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from yarl import URL

from tests.auth.fakes import FAST as HUNTER_FAST
from tests.auth.fakes import verdict
from tests.auth.oauth.helpers import REDIRECT_URI, oidc_settings, sign_in_at_provider
from tests.auth.oauth.test_github import FakeGitHub, github_settings, start_fake
from tests.auth.oauth.test_oidc_mock import Forwarder, flip_signature, start_forwarder
from tests.helpers import assert_problem, password_login, signup, verified_signup

AUTHORIZE = "/api/v1/auth/oauth/mock/authorize"
CALLBACK = "/api/v1/auth/oauth/mock/callback"


@pytest.fixture
async def client(make_auth_client: Any, mock_provider: Any) -> Any:
    return await make_auth_client(oauth=(oidc_settings(mock_provider.issuer),))


async def authorize(client: Any, **query: str) -> URL:
    response = await client.get(AUTHORIZE, params=query, allow_redirects=False)
    assert response.status == 302, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    return URL(response.headers["Location"])


async def sign_in(client: Any, session: Any, sub: str, claims: dict[str, Any] | None, **query: str) -> Any:
    """authorize -> the provider's consent -> callback; the callback's response."""
    location = await authorize(client, **query)
    code, state = await sign_in_at_provider(session, str(location), sub, claims)
    return await client.get(CALLBACK, params={"code": code, "state": state})


def identities(db: Any) -> list[tuple[str, str, str]]:
    with db.cursor() as cursor:
        cursor.execute("SELECT provider, subject, user_id::text FROM auth.identities ORDER BY created_at")
        return list(cursor.fetchall())


def user_count(db: Any) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users")
        return int(cursor.fetchone()[0])


async def test_authorize_redirects_with_state_pkce_and_nonce(client, mock_provider):
    location = await authorize(client)
    assert str(location).startswith(mock_provider.issuer)
    query = location.query
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == REDIRECT_URI
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 43
    assert len(query["nonce"]) >= 43
    assert "openid" in query["scope"].split()
    again = await authorize(client)
    assert again.query["state"] != query["state"]


async def test_unknown_provider_is_404(client):
    response = await client.get("/api/v1/auth/oauth/nope/authorize", allow_redirects=False)
    await assert_problem(response, 404, "unknown_provider")
    response = await client.get("/api/v1/auth/oauth/nope/callback", params={"code": "x", "state": "y"})
    await assert_problem(response, 404, "unknown_provider")


async def test_new_user_then_returning_user(client, session, db):
    sub = f"u-{uuid.uuid4().hex[:8]}"
    claims = {"email": f"{sub}@example.com", "email_verified": True}
    first = await sign_in(client, session, sub, claims)
    assert first.status == 201, await first.text()
    assert first.headers["Cache-Control"] == "no-store"
    body = await first.json()
    assert set(body) == {"user", "access_token", "refresh_token", "token_type", "expires_in"}
    assert body["user"]["email"] == claims["email"]
    assert body["user"]["referrer_id"] is None
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status == 200
    assert identities(db) == [("mock", sub, body["user"]["id"])]
    # A provider-only account has no password: the password grant refuses it like a wrong password.
    assert (await password_login(client, claims["email"], "whatever-it-is")).status == 400

    second = await sign_in(client, session, sub, claims)
    assert second.status == 200, await second.text()
    again = await second.json()
    assert again["user"]["id"] == body["user"]["id"]
    assert again["refresh_token"] != body["refresh_token"]
    assert user_count(db) == 1


async def test_a_vouched_email_links_to_the_existing_proven_account(client, session, db, mailbox):
    existing = await verified_signup(client, mailbox, "linda@example.com")
    response = await sign_in(
        client, session, "linda-sub", {"email": "Linda@Example.com", "email_verified": True}
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["user"]["id"] == existing["user"]["id"]
    assert identities(db) == [("mock", "linda-sub", existing["user"]["id"])]
    # Her password still works too, and so does her earlier login.
    assert (await password_login(client, "linda@example.com")).status == 200
    refreshed = await client.post(
        "/api/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": existing["refresh_token"]}
    )
    assert refreshed.status == 200


async def test_a_squatter_loses_the_unproven_account_to_the_provider_s_proof(client, session, db):
    """Tried as an attacker would: sign up with someone else's address and a password of one's own;
    the owner later signs in with a provider that vouches for the address. Before, the identity was
    linked into the squatter's account and the squatter's password and tokens kept working."""
    squatter = await signup(client, "owner@example.com", "squatter's password")
    response = await sign_in(
        client, session, "owner-sub", {"email": "owner@example.com", "email_verified": True}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["user"]["id"] == squatter["user"]["id"]  # the address's account, now the owner's
    assert body["user"]["email_verified"] is True
    assert identities(db) == [("mock", "owner-sub", squatter["user"]["id"])]
    assert (await password_login(client, "owner@example.com", "squatter's password")).status == 400
    refreshed = await client.post(
        "/api/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": squatter["refresh_token"]}
    )
    assert refreshed.status == 400
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert (await me.json())["email_verified"] is True


async def test_an_account_made_through_a_non_vouching_provider_is_lost_to_a_vouching_one(client, session, db):
    """The variant: a provider that does not vouch for the email creates an unproven account under it;
    the owner's verified sign-in takes it, and the first identity goes."""
    made = await sign_in(client, session, "squat-sub", {"email": "anna@example.com", "email_verified": False})
    assert made.status == 201, await made.text()
    assert (await made.json())["user"]["email_verified"] is False
    taken = await sign_in(client, session, "anna-sub", {"email": "anna@example.com", "email_verified": True})
    assert taken.status == 200, await taken.text()
    assert identities(db) == [("mock", "anna-sub", (await made.json())["user"]["id"])]
    again = await sign_in(
        client, session, "squat-sub", {"email": "anna@example.com", "email_verified": False}
    )
    await assert_problem(again, 409, "email_taken")


async def test_unverified_email_is_not_linked_and_creates_nothing(client, session, db):
    await signup(client, "mallory-target@example.com")
    response = await sign_in(
        client, session, "mallory", {"email": "mallory-target@example.com", "email_verified": False}
    )
    await assert_problem(response, 409, "email_taken")
    assert identities(db) == []
    assert user_count(db) == 1


async def test_denied_consent_is_oauth_failed(client, session, db):
    location = await authorize(client)
    async with session.post(str(location), data={"action": "deny"}, allow_redirects=False) as response:
        assert response.status == 302
        back = URL(response.headers["Location"])
    assert back.query["error"] == "access_denied"
    response = await client.get(CALLBACK, params=dict(back.query))
    body = await assert_problem(response, 400, "oauth_failed")
    assert "access_denied" in body["detail"]
    assert user_count(db) == 0


@pytest.mark.parametrize("state", [None, "", "made-up-state", "x" * 600])
async def test_bad_state_is_invalid_state(client, state):
    params = {"code": "whatever"}
    if state is not None:
        params["state"] = state
    response = await client.get(CALLBACK, params=params)
    assert response.status in (400, 422)
    if response.status == 400:
        await assert_problem(response, 400, "invalid_state")


async def test_state_is_single_use(client, session, db):
    location = await authorize(client)
    code, state = await sign_in_at_provider(session, str(location), "once", {"email": "once@example.com"})
    assert (await client.get(CALLBACK, params={"code": code, "state": state})).status == 201
    await assert_problem(
        await client.get(CALLBACK, params={"code": code, "state": state}), 400, "invalid_state"
    )
    assert user_count(db) == 1


async def test_state_of_another_provider_is_refused(make_auth_client, mock_provider, session, db):
    other = oidc_settings(mock_provider.issuer, name="other")
    client = await make_auth_client(oauth=(oidc_settings(mock_provider.issuer), other))
    location = await authorize(client)
    code, state = await sign_in_at_provider(session, str(location), "x", {"email": "x@example.com"})
    response = await client.get("/api/v1/auth/oauth/other/callback", params={"code": code, "state": state})
    await assert_problem(response, 400, "invalid_state")
    assert user_count(db) == 0


async def test_code_exchange_error_is_oauth_failed(client, session, db):
    location = await authorize(client)
    _, state = await sign_in_at_provider(session, str(location), "y", {"email": "y@example.com"})
    response = await client.get(CALLBACK, params={"code": "not-the-code", "state": state})
    await assert_problem(response, 400, "oauth_failed")
    assert user_count(db) == 0


async def test_provider_down_is_oauth_failed_quickly(make_auth_client, db):
    client = await make_auth_client(oauth=(oidc_settings("http://127.0.0.1:1", timeout=1.0),))
    response = await client.get(AUTHORIZE, allow_redirects=False)
    await assert_problem(response, 400, "oauth_failed")
    assert user_count(db) == 0


async def test_no_email_from_the_provider_is_oauth_failed(client, session, db):
    response = await sign_in(client, session, "mute", {"name": "No Email"})
    # oidc-provider-mock gives a user without claims their sub as email; with explicit claims, none.
    await assert_problem(response, 400, "oauth_failed")
    assert user_count(db) == 0


async def test_discovery_lists_the_configured_providers(client):
    doc = await (await client.get("/api/v1/auth/.well-known/openid-configuration")).json()
    assert doc["sign_in_providers"] == [
        {
            "name": "mock",
            "kind": "oidc",
            "authorization_endpoint": "http://127.0.0.1:8080/api/v1/auth/oauth/mock/authorize",
        }
    ]


async def test_no_providers_configured(auth_client):
    doc = await (await auth_client.get("/api/v1/auth/.well-known/openid-configuration")).json()
    assert doc["sign_in_providers"] == []
    response = await auth_client.get(AUTHORIZE, allow_redirects=False)
    await assert_problem(response, 404, "unknown_provider")


async def test_a_bad_id_token_is_oauth_failed(make_auth_client, aiohttp_server, mock_provider, session, db):
    forwarder = await start_forwarder(
        aiohttp_server, Forwarder(mock_provider.issuer, alter_id_token=flip_signature)
    )
    client = await make_auth_client(oauth=(oidc_settings(forwarder.url),))
    response = await sign_in(client, session, "victim", {"email": "victim@example.com"})
    await assert_problem(response, 400, "oauth_failed")
    assert len(forwarder.seen_id_tokens) == 1, "the token endpoint was reached through the forwarder"
    assert user_count(db) == 0


async def test_provider_down_at_the_callback_is_oauth_failed(
    make_auth_client, aiohttp_server, mock_provider, session, db
):
    forwarder = await start_forwarder(aiohttp_server, Forwarder(mock_provider.issuer))
    client = await make_auth_client(oauth=(oidc_settings(forwarder.url),))
    location = await authorize(client)
    code, state = await sign_in_at_provider(session, str(location), "late", {"email": "late@example.com"})
    forwarder.upstream = "http://127.0.0.1:1"  # the provider goes away before the code is exchanged
    response = await client.get(CALLBACK, params={"code": code, "state": state})
    await assert_problem(response, 400, "oauth_failed")
    assert user_count(db) == 0


# --- GitHub (plain OAuth2) through the API, against a fake GitHub on loopback ------------------------


async def test_github_sign_up_and_in(make_auth_client, aiohttp_server, db):
    fake = await start_fake(aiohttp_server, FakeGitHub())
    client = await make_auth_client(oauth=(github_settings(fake.url),))
    response = await client.get("/api/v1/auth/oauth/github/authorize", allow_redirects=False)
    assert response.status == 302
    location = URL(response.headers["Location"])
    assert str(location.with_query(None)) == f"{fake.url}/login/oauth/authorize"
    assert location.query["code_challenge_method"] == "S256"
    state = location.query["state"]
    # GitHub would show its consent page and send the browser back with a code.
    callback = "/api/v1/auth/oauth/github/callback"
    first = await client.get(callback, params={"code": "gh-code", "state": state})
    assert first.status == 201, await first.text()
    body = await first.json()
    assert body["user"]["email"] == "octo@example.com"
    assert identities(db) == [("github", "1234567", body["user"]["id"])]
    # The code verifier that matches the challenge went to the token endpoint.
    ((_, form),) = fake.token_requests
    assert form["code"] == "gh-code"
    assert form["code_verifier"]

    again = await client.get("/api/v1/auth/oauth/github/authorize", allow_redirects=False)
    second = await client.get(
        callback, params={"code": "gh-code-2", "state": URL(again.headers["Location"]).query["state"]}
    )
    assert second.status == 200
    assert (await second.json())["user"]["id"] == body["user"]["id"]


async def test_github_without_a_verified_primary_email_creates_nothing(make_auth_client, aiohttp_server, db):
    fake = await start_fake(
        aiohttp_server,
        FakeGitHub(
            emails=[{"email": "octo@example.com", "primary": True, "verified": False, "visibility": None}]
        ),
    )
    client = await make_auth_client(oauth=(github_settings(fake.url),))
    response = await client.get("/api/v1/auth/oauth/github/authorize", allow_redirects=False)
    state = URL(response.headers["Location"]).query["state"]
    result = await client.get("/api/v1/auth/oauth/github/callback", params={"code": "c", "state": state})
    await assert_problem(result, 400, "oauth_failed")
    assert user_count(db) == 0


# --- the email verifier applies to provider signups too -----------------------------------------------


async def test_provider_signup_checks_the_email(make_auth_client, mock_provider, session, hunter, db):
    hunter.answer("throwaway@example.com", verdict("disposable", 5))
    hunter.answer("fine@example.com", verdict("webmail", 80))
    client = await make_auth_client(
        oauth=(oidc_settings(mock_provider.issuer),), hunter_base_url=hunter.url, **HUNTER_FAST
    )
    refused = await sign_in(
        client, session, "disp", {"email": "throwaway@example.com", "email_verified": True}
    )
    await assert_problem(refused, 422, "email_undeliverable")
    assert user_count(db) == 0
    accepted = await sign_in(client, session, "fine", {"email": "fine@example.com", "email_verified": True})
    assert accepted.status == 201
    token = (await accepted.json())["access_token"]
    me = await (await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})).json()
    assert me["email_check"]["status"] == "webmail"
