"""GitHubProvider against a fake GitHub on loopback (token endpoint, /user, /user/emails)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from services.auth.adapters.oauth.config import GITHUB, OAuthProviderSettings
from services.auth.adapters.oauth.providers import GitHubProvider, ProviderError
from tests.auth.oauth.helpers import CLIENT_ID, CLIENT_SECRET, free_port

REDIRECT_URI = "http://127.0.0.1:8080/api/v1/auth/oauth/github/callback"
TOKEN = "gho_test_token"


@dataclass
class FakeGitHub:
    url: str = ""
    token_body: dict[str, Any] = field(
        default_factory=lambda: {
            "access_token": TOKEN,
            "token_type": "bearer",
            "scope": "read:user,user:email",
        }
    )
    user: dict[str, Any] = field(default_factory=lambda: {"id": 1234567, "login": "octocat"})
    emails: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"email": "other@example.com", "primary": False, "verified": True, "visibility": None},
            {"email": "octo@example.com", "primary": True, "verified": True, "visibility": "public"},
        ]
    )
    user_status: int = 200
    emails_status: int = 200
    token_requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    api_auth: list[str] = field(default_factory=list)


async def start_fake(aiohttp_server: Any, fake: FakeGitHub) -> FakeGitHub:
    async def access_token(request: web.Request) -> web.Response:
        form = await request.post()
        fake.token_requests.append((dict(request.headers), {k: str(v) for k, v in form.items()}))
        # GitHub answers 200 even for errors, in the format Accept asks for.
        if request.headers.get("Accept") != "application/json":
            return web.Response(text="access_token=x&token_type=bearer")
        return web.json_response(fake.token_body)

    def api(status_of: str, body_of: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            fake.api_auth.append(request.headers.get("Authorization", ""))
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return web.json_response({"message": "Bad credentials"}, status=401)
            status = getattr(fake, status_of)
            if status != 200:
                return web.json_response({"message": "Server Error"}, status=status)
            return web.json_response(getattr(fake, body_of))

        return handler

    app = web.Application()
    app.router.add_post("/login/oauth/access_token", access_token)
    app.router.add_get("/user", api("user_status", "user"))
    app.router.add_get("/user/emails", api("emails_status", "emails"))
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


def github_settings(base: str, **changes: Any) -> OAuthProviderSettings:
    values: dict[str, Any] = {
        "name": "github",
        "kind": GITHUB,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "read:user user:email",
        "authorize_url": f"{base}/login/oauth/authorize",
        "token_url": f"{base}/login/oauth/access_token",
        "api_url": base,
        "timeout": 5.0,
    }
    values.update(changes)
    return OAuthProviderSettings(**values)


@pytest.fixture
async def fake(aiohttp_server) -> FakeGitHub:
    return await start_fake(aiohttp_server, FakeGitHub())


@pytest.fixture
def github(fake, session) -> GitHubProvider:
    return GitHubProvider(github_settings(fake.url), session)


async def exchange(provider: GitHubProvider) -> Any:
    return await provider.exchange(
        code="gh-code", redirect_uri=REDIRECT_URI, code_verifier="v" * 64, nonce="unused"
    )


async def test_authorization_url(github, fake):
    url = URL(
        await github.authorization_url(redirect_uri=REDIRECT_URI, state="st", code_challenge="ch", nonce="nn")
    )
    assert str(url.with_query(None)) == f"{fake.url}/login/oauth/authorize"
    assert dict(url.query) == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "read:user user:email",
        "state": "st",
        "code_challenge": "ch",
        "code_challenge_method": "S256",
    }


async def test_the_primary_verified_email_is_accepted(github, fake):
    identity = await exchange(github)
    assert (identity.subject, identity.email, identity.email_verified) == (
        "1234567",
        "octo@example.com",
        True,
    )
    ((headers, form),) = fake.token_requests
    assert headers["Accept"] == "application/json"
    assert form == {
        "grant_type": "authorization_code",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "code": "gh-code",
        "redirect_uri": REDIRECT_URI,
        "code_verifier": "v" * 64,
    }
    assert fake.api_auth == [f"Bearer {TOKEN}"] * 2


@pytest.mark.parametrize(
    "emails",
    [
        pytest.param(
            [{"email": "p@example.com", "primary": True, "verified": False}], id="primary-unverified"
        ),
        pytest.param(
            [
                {"email": "p@example.com", "primary": True, "verified": False},
                {"email": "v@example.com", "primary": False, "verified": True},
            ],
            id="only-a-verified-secondary",
        ),
        pytest.param([], id="none"),
    ],
)
async def test_without_a_primary_verified_email_sign_in_fails(github, fake, emails):
    fake.emails = emails
    with pytest.raises(ProviderError, match="verified primary email"):
        await exchange(github)


async def test_a_token_error_answered_with_200_fails(github, fake):
    fake.token_body = {
        "error": "bad_verification_code",
        "error_description": "The code passed is incorrect or expired.",
        "error_uri": "https://docs.github.com/",
    }
    with pytest.raises(ProviderError, match="bad_verification_code") as caught:
        await exchange(github)
    assert "incorrect" not in caught.value.reason
    assert fake.api_auth == [], "no API call without a token"


@pytest.mark.parametrize(("user_status", "emails_status"), [(502, 200), (200, 500)])
async def test_api_5xx_fails(github, fake, user_status, emails_status):
    fake.user_status, fake.emails_status = user_status, emails_status
    with pytest.raises(ProviderError, match=f"HTTP {max(user_status, emails_status)}"):
        await exchange(github)


async def test_a_user_without_id_fails(github, fake):
    fake.user = {"login": "ghost"}
    with pytest.raises(ProviderError, match="no id"):
        await exchange(github)


async def test_github_unreachable_fails_quickly(session):
    github = GitHubProvider(github_settings(f"http://127.0.0.1:{free_port()}"), session)
    started = time.monotonic()
    with pytest.raises(ProviderError, match="unreachable"):
        await exchange(github)
    assert time.monotonic() - started < 2
