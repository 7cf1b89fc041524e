"""The referral service under test, verifying tokens against a real auth service's JWKS over HTTP."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from services.auth.app import create_app as create_auth_app
from services.auth.settings import AuthSettings
from services.referral.app import create_app as create_referral_app
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import load_settings
from tests.helpers import User, signup

CODES = "/api/v1/referral/codes"
REFERRALS = "/api/v1/referral/referrals"


@dataclass
class System:
    """A real auth service (on a loopback port) and the referral service that trusts its JWKS."""

    auth: TestClient[Any, Any]
    referral: TestClient[Any, Any]
    auth_settings: AuthSettings
    referral_settings: ReferralSettings

    async def user(self, email: str) -> User:
        body = await signup(self.auth, email)
        return User(body["user"]["id"], body["user"]["email"], body["access_token"])

    async def create_code(self, user: User, code: str | None = None, *, minutes: int = 60) -> Any:
        expires_at = (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()
        body: dict[str, Any] = {"expires_at": expires_at}
        if code is not None:
            body["code"] = code
        return await self.referral.post(CODES, json=body, headers=user.headers)

    async def activate(self, user: User, code: str) -> Any:
        return await self.referral.post(REFERRALS, json={"code": code}, headers=user.headers)

    async def referrals_of(self, viewer: User, referrer_id: str, **query: Any) -> Any:
        return await self.referral.get(
            f"/api/v1/referral/referrers/{referrer_id}/referrals", params=query, headers=viewer.headers
        )


@pytest.fixture
def referral_settings(database_url: str, redis_url: str, redis_prefix: str) -> ReferralSettings:
    environ = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        f"{REFERRAL_PREFIX}ENV": "production",
        f"{REFERRAL_PREFIX}REDIS_PREFIX": f"{redis_prefix}ref:",
        f"{REFERRAL_PREFIX}DB_POOL_MIN": "1",
        f"{REFERRAL_PREFIX}DB_POOL_MAX": "24",
    }
    return load_settings(ReferralSettings, REFERRAL_PREFIX, environ)


@pytest.fixture
def make_system(
    aiohttp_client: Any, auth_settings: AuthSettings, referral_settings: ReferralSettings, db: Any
) -> Any:
    """`await make_system(cache_ttl=5)`: both services, the referral one with some settings changed."""

    async def make(**changes: Any) -> System:
        auth = await aiohttp_client(create_auth_app(auth_settings))
        jwks_url = str(auth.make_url("/api/v1/auth/.well-known/jwks.json"))
        settings = replace(
            referral_settings, auth_jwks_url=jwks_url, auth_issuer=auth_settings.issuer, **changes
        )
        referral = await aiohttp_client(create_referral_app(settings))
        return System(auth, referral, auth_settings, settings)

    return make


@pytest.fixture
async def system(make_system: Any) -> System:
    return await make_system()
