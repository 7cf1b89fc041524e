"""DELETE /api/v1/auth/me of an account without a password (provider sign-in only, against a real
OpenID Connect provider): it needs an access token issued in the last 5 minutes (API.md, "Data rights"),
else 403 `reauthentication_required`; a password does not stand in for it. The referral service is a
fake on loopback that records the erasures it is sent (the `erasures` fixture). Accounts with a
password: tests/auth/test_erasure.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from joserfc import jwt

from services.auth.adapters.signing import ALGORITHM, parse_key_ring
from shared.tokens import ACCESS_TOKEN_TYPE
from tests.auth.fakes import FakeErasures
from tests.auth.oauth.helpers import oidc_settings
from tests.auth.oauth.test_flow import sign_in
from tests.auth.test_erasure import ME, bearer, rows
from tests.helpers import assert_problem

WINDOW = 300  # seconds: how recent a token an account without a password needs


@pytest.fixture
async def client(make_auth_client: Any, mock_provider: Any, erasures: FakeErasures) -> Any:
    return await make_auth_client(
        oauth=(oidc_settings(mock_provider.issuer),), referral_service_url=erasures.url
    )


async def provider_account(client: Any, session: Any) -> dict[str, Any]:
    """A new account made by signing in with the provider (no password); the callback's 201 body."""
    sub = f"u-{uuid.uuid4().hex[:8]}"
    response = await sign_in(client, session, sub, {"email": f"{sub}@example.com", "email_verified": True})
    assert response.status == 201, await response.text()
    return {"sub": sub, **dict(await response.json())}


def token_issued(signing_pem: str, settings: Any, user_id: str, *, seconds_ago: int) -> str:
    """An access token as the service signs them, but issued `seconds_ago` (and still unexpired)."""
    key = parse_key_ring(signing_pem).signing_key
    issued = int(time.time()) - seconds_ago
    claims = {
        "iss": settings.issuer,
        "aud": settings.token_audience,
        "sub": user_id,
        "iat": issued,
        "exp": issued + settings.access_token_ttl,
        "jti": uuid.uuid4().hex,
    }
    header = {"alg": ALGORITHM, "kid": key.kid, "typ": ACCESS_TOKEN_TYPE}
    return jwt.encode(header, claims, key, algorithms=[ALGORITHM])


async def test_an_account_without_a_password_is_erased_with_a_fresh_token(client, session, db, erasures):
    account = await provider_account(client, session)
    user_id = account["user"]["id"]
    delivered = "SELECT count(*) FROM auth.erasure_outbox WHERE delivered_at IS NOT NULL"
    [(delivered_before,)] = rows(db, delivered)
    response = await client.delete(ME, json={}, headers=bearer(account["access_token"]))
    assert response.status == 204, await response.text()

    assert rows(db, "SELECT id FROM auth.users WHERE id = %s", user_id) == []
    assert rows(db, "SELECT user_id FROM auth.identities WHERE subject = %s", account["sub"]) == []
    assert rows(db, "SELECT user_id FROM auth.refresh_tokens WHERE user_id = %s", user_id) == []
    # The referral service was told at once, with a service token, and a random replacement id.
    [(replacement, authorization)] = erasures.of(user_id)
    assert authorization.startswith("Bearer ")
    assert uuid.UUID(replacement) != uuid.UUID(user_id)
    # Delivered before the answer; the delivered row keeps neither id.
    assert rows(db, delivered) == [(delivered_before + 1,)]
    assert rows(
        db,
        "SELECT count(*) FROM auth.erasure_outbox WHERE user_id = %s OR replacement_id = %s",
        user_id,
        replacement,
    ) == [(0,)]
    # The token is refused from now on; so is a repeat of the erasure, and the refresh token is gone.
    await assert_problem(await client.get(ME, headers=bearer(account["access_token"])), 401)
    await assert_problem(await client.delete(ME, json={}, headers=bearer(account["access_token"])), 401)
    refreshed = await client.post(
        "/api/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": account["refresh_token"]}
    )
    assert refreshed.status == 400
    # Signing in with the provider again makes a new account: nothing links it to the erased one.
    again = await sign_in(client, session, account["sub"], None)
    assert again.status == 201, await again.text()
    assert (await again.json())["user"]["id"] != user_id


async def test_an_account_without_a_password_needs_a_token_from_the_last_five_minutes(
    client, session, db, erasures, signing_pem, auth_settings
):
    account = await provider_account(client, session)
    user_id = account["user"]["id"]
    for seconds_ago in (WINDOW + 30, 14 * 60):
        stale = token_issued(signing_pem, auth_settings, user_id, seconds_ago=seconds_ago)
        assert (await client.get(ME, headers=bearer(stale))).status == 200  # a valid token all the same
        response = await client.delete(ME, json={}, headers=bearer(stale))
        await assert_problem(response, 403, "reauthentication_required")
        # A password does not stand in for the recent sign-in: the account has none.
        response = await client.delete(ME, json={"password": "anything at all"}, headers=bearer(stale))
        await assert_problem(response, 403, "reauthentication_required")
    assert rows(db, "SELECT id::text FROM auth.users WHERE id = %s", user_id) == [(user_id,)]
    assert erasures.of(user_id) == []

    recent = token_issued(signing_pem, auth_settings, user_id, seconds_ago=WINDOW - 30)
    response = await client.delete(ME, json={}, headers=bearer(recent))
    assert response.status == 204, await response.text()
    assert rows(db, "SELECT id FROM auth.users WHERE id = %s", user_id) == []
    assert len(erasures.of(user_id)) == 1
