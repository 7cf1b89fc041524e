"""CORS (shared/cors.py) on the real apps: off by default, exact origins when configured, errors too."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from services.referral.app import create_app as create_referral_app
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import SettingsError, load_settings
from shared.cors import check_origins
from tests.helpers import assert_problem

APP = "https://app.example.com"
OTHER = "http://localhost:3000"
SIGNUP = "/api/v1/auth/signup"
ME = "/api/v1/auth/me"
JWKS = "/api/v1/auth/.well-known/jwks.json"
CODES = "/api/v1/referral/codes"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def cors_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def vary(response: Any) -> list[str]:
    return [part.strip() for value in response.headers.getall("Vary", []) for part in value.split(",")]


def assert_granted(response: Any, origin: str) -> None:
    assert response.headers.getall("Access-Control-Allow-Origin") == [origin]
    assert (
        response.headers["Access-Control-Expose-Headers"]
        == "X-Request-ID, Retry-After, WWW-Authenticate, Idempotent-Replayed"
    )
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in vary(response)


@pytest.fixture
async def cors_auth(make_auth_client: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await make_auth_client(cors_origins=(APP, OTHER))
    return client


@pytest.fixture
async def cors_referral(
    aiohttp_client: Any, database_url: str, redis_url: str, redis_prefix: str, db: Any
) -> TestClient[Any, Any]:
    settings = load_settings(
        ReferralSettings,
        REFERRAL_PREFIX,
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            f"{REFERRAL_PREFIX}REDIS_PREFIX": f"{redis_prefix}ref:",
            f"{REFERRAL_PREFIX}DB_POOL_MIN": "1",
            f"{REFERRAL_PREFIX}CORS_ORIGINS": f" {APP} ,",
        },
    )
    assert settings.cors_origins == (APP,)
    client: TestClient[Any, Any] = await aiohttp_client(create_referral_app(settings))
    return client


# Off by default.


async def test_off_by_default_no_cors_header_anywhere(auth_client: TestClient[Any, Any]) -> None:
    headers = {"Origin": APP}
    response = await auth_client.get(JWKS, headers=headers)
    assert response.status == 200
    assert cors_headers(response) == {}
    assert "Origin" not in vary(response)

    response = await auth_client.post(
        SIGNUP, data=b"{", headers={**headers, "Content-Type": "application/json"}
    )
    await assert_problem(response, 400, "malformed_json")
    assert cors_headers(response) == {}


async def test_off_by_default_a_preflight_is_refused_like_any_unknown_method(
    auth_client: TestClient[Any, Any],
) -> None:
    response = await auth_client.options(SIGNUP, headers={"Origin": APP, **PREFLIGHT})
    await assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]
    assert cors_headers(response) == {}
    response = await auth_client.options("/api/v1/auth/nothing", headers={"Origin": APP, **PREFLIGHT})
    await assert_problem(response, 404)
    assert cors_headers(response) == {}


# Configured: the auth service.


async def test_a_preflight_from_an_allowed_origin_is_granted(cors_auth: TestClient[Any, Any]) -> None:
    for origin in (APP, OTHER):
        response = await cors_auth.options(SIGNUP, headers={"Origin": origin, **PREFLIGHT})
        assert response.status == 204
        assert await response.read() == b""
        assert cors_headers(response) == {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-ID, Idempotency-Key",
            "Access-Control-Max-Age": "600",
        }
        assert vary(response) == ["Origin"]
        assert response.headers["X-Request-ID"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_answers_to_an_allowed_origin_carry_the_grant(cors_auth: TestClient[Any, Any]) -> None:
    headers = {"Origin": APP, "X-Request-ID": "cors-1"}
    response = await cors_auth.post(
        SIGNUP, json={"email": "cors@example.com", "password": "correct horse"}, headers=headers
    )
    assert response.status == 201, await response.text()
    assert_granted(response, APP)
    assert response.headers["X-Request-ID"] == "cors-1"
    response = await cors_auth.get(JWKS, headers=headers)
    assert response.status == 200
    assert_granted(response, APP)


async def test_error_answers_carry_the_grant_too(cors_auth: TestClient[Any, Any]) -> None:
    origin = {"Origin": OTHER}
    # problem+json from the error middleware: 401 with its challenge, 400, 422, 404, 405.
    response = await cors_auth.get(ME, headers=origin)
    await assert_problem(response, 401, "invalid_token")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_granted(response, OTHER)
    response = await cors_auth.post(SIGNUP, data=b"{", headers={**origin, "Content-Type": "application/json"})
    await assert_problem(response, 400, "malformed_json")
    assert_granted(response, OTHER)
    response = await cors_auth.post(SIGNUP, json={"email": "nope"}, headers=origin)
    await assert_problem(response, 422, "validation_failed")
    assert_granted(response, OTHER)
    response = await cors_auth.get("/api/v1/auth/nothing", headers=origin)
    await assert_problem(response, 404)
    assert_granted(response, OTHER)
    response = await cors_auth.delete(SIGNUP, headers=origin)
    await assert_problem(response, 405)
    assert_granted(response, OTHER)
    # OAuth2's own error format (/token), and a body over the limit (aiohttp's 413).
    response = await cors_auth.post("/api/v1/auth/token", data={"grant_type": "nope"}, headers=origin)
    assert response.status == 400
    assert_granted(response, OTHER)
    response = await cors_auth.post(
        SIGNUP, data=b"x" * (1024 * 1024), headers={**origin, "Content-Type": "application/json"}
    )
    await assert_problem(response, 413)
    assert_granted(response, OTHER)


async def test_other_origins_get_no_grant(cors_auth: TestClient[Any, Any]) -> None:
    for origin in (
        "https://evil.example.com",
        "https://app.example.com.evil.example",
        "http://app.example.com",  # another scheme
        "https://app.example.com:8443",  # another port
        "https://APP.example.com",  # not as a browser sends it
        f"{APP}/",
        "null",
        "*",
    ):
        response = await cors_auth.get(JWKS, headers={"Origin": origin})
        assert response.status == 200
        assert cors_headers(response) == {}, origin
        assert vary(response) == ["Origin"]  # the answer depends on the Origin: caches must know
        response = await cors_auth.options(SIGNUP, headers={"Origin": origin, **PREFLIGHT})
        await assert_problem(response, 405)
        assert cors_headers(response) == {}, origin
    response = await cors_auth.get(JWKS)  # no Origin at all: a same-origin or non-browser client
    assert cors_headers(response) == {}
    assert vary(response) == ["Origin"]
    # Two Origin headers are no origin.
    response = await cors_auth.get(JWKS, headers=[("Origin", APP), ("Origin", APP)])
    assert cors_headers(response) == {}


async def test_options_without_a_request_method_is_not_a_preflight(cors_auth: TestClient[Any, Any]) -> None:
    response = await cors_auth.options(SIGNUP, headers={"Origin": APP})
    await assert_problem(response, 405)
    assert_granted(response, APP)
    assert "Access-Control-Allow-Methods" not in response.headers


# Configured: the referral service.


async def test_the_referral_service_grants_its_own_origins(cors_referral: TestClient[Any, Any]) -> None:
    response = await cors_referral.options(
        f"{CODES}/me", headers={"Origin": APP, "Access-Control-Request-Method": "DELETE"}
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"]

    response = await cors_referral.get(f"{CODES}/me", headers={"Origin": APP, "Authorization": "Bearer x"})
    await assert_problem(response, 401, "invalid_token")
    assert_granted(response, APP)
    response = await cors_referral.get(CODES, params={"email": "nobody@example.com"}, headers={"Origin": APP})
    await assert_problem(response, 404, "code_not_found")
    assert_granted(response, APP)

    # Only its own list: the auth service's other origin is not granted here.
    response = await cors_referral.get(
        CODES, params={"email": "nobody@example.com"}, headers={"Origin": OTHER}
    )
    assert cors_headers(response) == {}
    response = await cors_referral.options(CODES, headers={"Origin": OTHER, **PREFLIGHT})
    await assert_problem(response, 405)
    assert cors_headers(response) == {}


# The setting.


@pytest.mark.parametrize(
    "origins",
    [
        ("*",),
        (APP, "*"),
        ("app.example.com",),
        (f"{APP}/",),
        (f"{APP}/path",),
        ("https://App.example.com",),
        ("ftp://app.example.com",),
        ("https://app.example.com:443",),
        ("http://localhost:80",),
        ("https://app.example.com:99999",),
        ("null",),
        ("https://user@app.example.com",),
    ],
)
def test_bad_origins_are_refused(origins: tuple[str, ...]) -> None:
    with pytest.raises(SettingsError, match="REFERRAL_CORS_ORIGINS"):
        load_settings(
            ReferralSettings,
            REFERRAL_PREFIX,
            {
                "DATABASE_URL": "postgresql://x",
                "REDIS_URL": "redis://x",
                "REFERRAL_CORS_ORIGINS": ",".join(origins),
            },
        )


def test_good_origins_are_accepted() -> None:
    check_origins(
        (APP, OTHER, "http://127.0.0.1:8080", "https://[::1]:8443", "https://a-b.example.co.uk"), "X"
    )
    settings = load_settings(
        ReferralSettings, REFERRAL_PREFIX, {"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x"}
    )
    assert settings.cors_origins == ()


async def test_auth_settings_refuse_a_wildcard(make_auth_client: Any) -> None:
    with pytest.raises(SettingsError, match=r"AUTH_CORS_ORIGINS must list exact origins"):
        await make_auth_client(cors_origins=("*",))
