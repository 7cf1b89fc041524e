"""The referral service under test, verifying tokens against a real auth service's JWKS over HTTP.

The auth service knows the referral service's URL too, as in production: its relays deliver the links
of signups with a code and the "verified" notices to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, unused_port

from services.auth.adapters.signing import AccessTokenIssuer, parse_key_ring
from services.auth.app import create_app as create_auth_app
from services.auth.settings import AuthSettings
from services.referral.app import create_app as create_referral_app
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import load_settings
from tests.helpers import Mailbox, User, signup, verified_signup

CODES = "/api/v1/referral/codes"
REFERRALS = "/api/v1/referral/referrals"
INTERNAL_LINK = "/internal/v1/referrals"


def verified_path(user_id: str) -> str:
    """The internal endpoint of the auth service's notice that `user_id`'s address is proven."""
    return f"/internal/v1/users/{user_id}/verified"


def service_token(
    system: System,
    signing_pem: str,
    *,
    audience: str | None = None,
    scope: tuple[str, ...] = ("referrals:internal",),
    subject: str = "auth-service",
) -> str:
    """A service token as the auth service signs one for /internal/ (its key, audience and scope)."""
    issuer = AccessTokenIssuer(
        parse_key_ring(signing_pem), issuer=system.auth_settings.issuer, audience="unused", ttl=300
    )
    audience = audience or system.referral_settings.internal_audience
    return issuer.issue(subject, email=None, audience=audience, scope=scope).token


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class System:
    """A real auth service (on a loopback port) and the referral service that trusts its JWKS."""

    auth: TestClient[Any, Any]
    referral: TestClient[Any, Any]
    auth_settings: AuthSettings
    referral_settings: ReferralSettings
    mailbox: Mailbox
    signing_pem: str
    _service_headers: dict[str, str] = field(default_factory=dict)

    async def user(self, email: str, *, verified: bool = True) -> User:
        """A user signed up with the auth service; `verified`: their address proven as its owner does
        (the link of the mail it received), and a token from a login after that (`email_verified`)."""
        if verified:
            body = await verified_signup(self.auth, self.mailbox, email)
        else:
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

    def service_headers(self) -> dict[str, str]:
        """What the auth service sends to /internal/: its service token (made once: parsing the key
        costs milliseconds)."""
        if not self._service_headers:
            self._service_headers.update(auth_header(service_token(self, self.signing_pem)))
        return dict(self._service_headers)

    async def notify_verified(self, user_id: str) -> Any:
        """The auth service's notice: `user_id`'s address is proven."""
        return await self.referral.post(verified_path(user_id), headers=self.service_headers())

    async def signup_link(self, referral_id: str, referrer_id: str, email: str, code: str = "C0DE") -> Any:
        """The auth service's link for a signup with a code."""
        link = {"referral_id": referral_id, "referrer_id": referrer_id, "referral_email": email, "code": code}
        return await self.referral.post(INTERNAL_LINK, json=link, headers=self.service_headers())


@pytest.fixture
def referral_settings(database_url: str, redis_url: str, redis_prefix: str) -> ReferralSettings:
    environ = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        f"{REFERRAL_PREFIX}ENV": "production",
        f"{REFERRAL_PREFIX}REDIS_PREFIX": f"{redis_prefix}ref:",
        # The auth service's (tests/conftest.py): one deny-list channel, as in production.
        f"{REFERRAL_PREFIX}DENY_LIST_PREFIX": f"{redis_prefix}deny:",
        f"{REFERRAL_PREFIX}DB_POOL_MIN": "1",
        f"{REFERRAL_PREFIX}DB_POOL_MAX": "24",
    }
    return load_settings(ReferralSettings, REFERRAL_PREFIX, environ)


@pytest.fixture
def make_system(
    aiohttp_client: Any,
    auth_settings: AuthSettings,
    referral_settings: ReferralSettings,
    db: Any,
    mailbox: Mailbox,
    signing_pem: str,
) -> Any:
    """`await make_system(cache_ttl=5)`: both services, the referral one with some settings changed."""

    async def make(**changes: Any) -> System:
        # Each knows the other's URL: the referral service's port is chosen before the auth service starts.
        port = unused_port()
        auth_with_url = replace(auth_settings, referral_service_url=f"http://127.0.0.1:{port}")
        auth = await aiohttp_client(create_auth_app(auth_with_url))
        jwks_url = str(auth.make_url("/api/v1/auth/.well-known/jwks.json"))
        settings = replace(
            referral_settings, auth_jwks_url=jwks_url, auth_issuer=auth_settings.issuer, **changes
        )
        referral = await aiohttp_client(create_referral_app(settings), server_kwargs={"port": port})
        return System(auth, referral, auth_with_url, settings, mailbox, signing_pem)

    return make


@pytest.fixture
async def system(make_system: Any) -> System:
    return await make_system()
