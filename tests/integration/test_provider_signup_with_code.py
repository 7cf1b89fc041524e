"""A referral code given at a provider's authorize step, carried through `state`, applied like signup's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.auth.oauth.helpers import oidc_settings, running_mock_provider, sign_in_at_provider
from tests.integration.conftest import eventually, new_email, referrals_in, users_with

AUTHORIZE = "/api/v1/auth/oauth/mock/authorize"
CALLBACK = "/api/v1/auth/oauth/mock/callback"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_mock_provider(tmp_path_factory.mktemp("oidc") / "provider.log") as running:
        yield running


@pytest.fixture
def auth_settings(auth_settings: Any, provider: Any) -> Any:
    """The cluster's auth service, with the mock provider configured."""
    return replace(auth_settings, oauth=(oidc_settings(provider.issuer),))


async def provider_sign_in(cluster: Any, sub: str, email: str, **query: str) -> Any:
    async with cluster.http.get(
        cluster.auth_url + AUTHORIZE, params=query, allow_redirects=False
    ) as response:
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
    code, state = await sign_in_at_provider(
        cluster.http, location, sub, {"email": email, "email_verified": True}
    )
    return await cluster.http.get(cluster.auth_url + CALLBACK, params={"code": code, "state": state})


async def test_code_through_state_links_the_new_user(cluster, db):
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    email = new_email("via-provider")
    response = await provider_sign_in(cluster, "sub-1", email, referral_code=code)
    assert response.status == 201, await response.text()
    user = (await response.json())["user"]
    assert user["referrer_id"] == owner.id
    await eventually(lambda: referrals_in(db, owner.id) == [(user["id"], code)])


async def test_unknown_code_through_state_creates_nothing(cluster, db):
    email = new_email("nobody")
    response = await provider_sign_in(cluster, "sub-2", email, referral_code="NOSUCHCODE")
    assert response.status == 404, await response.text()
    assert (await response.json())["code"] == "code_not_found"
    assert users_with(db, email) == 0


async def test_referral_service_down_answers_503_and_creates_nothing(cluster, db):
    _, code = await cluster.referrer_with_code(new_email("owner"))
    await cluster.stop_referral()
    email = new_email("while-down")
    response = await provider_sign_in(cluster, "sub-3", email, referral_code=code)
    assert response.status == 503, await response.text()
    assert response.headers["Retry-After"]
    assert users_with(db, email) == 0


async def test_the_code_is_ignored_for_a_returning_user(cluster, db):
    email = new_email("returning")
    assert (await provider_sign_in(cluster, "sub-4", email)).status == 201
    owner, code = await cluster.referrer_with_code(new_email("owner"))
    again = await provider_sign_in(cluster, "sub-4", email, referral_code=code)
    assert again.status == 200
    assert (await again.json())["user"]["referrer_id"] is None
    assert referrals_in(db, owner.id) == []
