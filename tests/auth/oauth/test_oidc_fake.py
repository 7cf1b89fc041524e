"""OIDCProvider against a scriptable provider on loopback: EC keys, key rotation, client authentication,
the userinfo fallback, and the claim checks the real provider cannot be made to get wrong."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from yarl import URL

from services.auth.adapters.oauth.providers import OIDCProvider, ProviderError
from tests.auth.oauth.helpers import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, b64url, oidc_settings

NONCE = "n-0S6_WzA2Mj"
ACCESS_TOKEN = "fake-access-token"


def client_auth_of(headers: Mapping[str, str], form: Mapping[str, str]) -> str:
    """How a token request authenticated its client, as a provider sees it."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        return "client_secret_basic" if authorization.startswith("Basic ") else "unknown"
    if "client_secret" in form:
        return "client_secret_post"
    return "none" if form.get("client_id") else "unknown"


@dataclass(frozen=True)
class Grant:
    """What the fake's authorization endpoint issued a code for."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str


@dataclass
class FakeOIDC:
    """What the fake provider publishes and answers; tests change it and read what it received."""

    url: str = ""
    key: Any = field(
        default_factory=lambda: ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True)
    )
    published: list[Any] = field(default_factory=list)
    algorithm: str = "ES256"
    discovery: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)
    userinfo: dict[str, Any] = field(default_factory=dict)
    token_status: int = 200
    token_body: dict[str, Any] | None = None
    token_delay: float = 0.0
    token_requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    jwks_fetches: int = 0
    jwks_status: int = 200
    userinfo_auth: list[str] = field(default_factory=list)
    # The one client authentication method the token endpoint accepts (None: any), and the codes its
    # authorization endpoint issued (their token requests must prove PKCE S256).
    accepts: str | None = None
    grants: dict[str, Grant] = field(default_factory=dict)

    def id_token(self, nonce: str = NONCE, audience: str = CLIENT_ID) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": "subject-1",
            "aud": audience,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            "email": "ec@example.com",
            "email_verified": True,
            **self.claims,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"alg": self.algorithm, "kid": self.key.kid, **self.header}
        header = {k: v for k, v in header.items() if v is not None}
        return jwt.encode(header, claims, self.key, algorithms=[self.algorithm])


async def start_fake(aiohttp_server: Any, fake: FakeOIDC) -> FakeOIDC:
    async def discovery(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": fake.url,
                "authorization_endpoint": f"{fake.url}/authorize",
                "token_endpoint": f"{fake.url}/token",
                "jwks_uri": f"{fake.url}/jwks",
                "userinfo_endpoint": f"{fake.url}/userinfo",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                **fake.discovery,
            }
        )

    async def jwks(request: web.Request) -> web.Response:
        fake.jwks_fetches += 1
        keys = fake.published or [fake.key]
        return web.json_response(
            {"keys": [key.as_dict(private=False) for key in keys]}, status=fake.jwks_status
        )

    async def authorize(request: web.Request) -> web.Response:
        """Consent given at once: back to the redirect URI with a code bound to the PKCE challenge."""
        query = request.query
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return web.json_response({"error": "invalid_request"}, status=400)
        code = secrets.token_urlsafe(16)
        fake.grants[code] = Grant(
            query["client_id"], query["redirect_uri"], query["code_challenge"], query.get("nonce", "")
        )
        location = URL(query["redirect_uri"]).update_query(code=code, state=query["state"])
        raise web.HTTPFound(location)

    async def token(request: web.Request) -> web.Response:
        raw = await request.post()
        form = {k: str(v) for k, v in raw.items()}
        fake.token_requests.append((dict(request.headers), form))
        if fake.token_delay:
            await asyncio.sleep(fake.token_delay)
        if fake.accepts is not None and client_auth_of(request.headers, form) != fake.accepts:
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = fake.grants.pop(form.get("code", ""), None)
        nonce, audience = NONCE, CLIENT_ID
        if grant is not None:
            verifier = form.get("code_verifier", "")
            challenge = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
            client_id = form.get("client_id", grant.client_id)
            if (challenge, form.get("redirect_uri"), client_id) != (
                grant.code_challenge,
                grant.redirect_uri,
                grant.client_id,
            ):
                return web.json_response({"error": "invalid_grant"}, status=400)
            nonce, audience = grant.nonce, grant.client_id
        body = fake.token_body or {
            "access_token": ACCESS_TOKEN,
            "token_type": "Bearer",
            "id_token": fake.id_token(nonce, audience),
        }
        return web.json_response(body, status=fake.token_status)

    async def userinfo(request: web.Request) -> web.Response:
        fake.userinfo_auth.append(request.headers.get("Authorization", ""))
        return web.json_response(fake.userinfo)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/authorize", authorize)
    app.router.add_post("/token", token)
    app.router.add_get("/userinfo", userinfo)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def fake(aiohttp_server) -> FakeOIDC:
    return await start_fake(aiohttp_server, FakeOIDC())


def provider_for(fake: FakeOIDC, session: Any, **options: Any) -> OIDCProvider:
    settings = {key: options.pop(key) for key in ("client_id", "client_secret") if key in options}
    timeout = options.pop("timeout", 5.0)
    return OIDCProvider(oidc_settings(fake.url, timeout=timeout, **settings), session, **options)


async def exchange(provider: OIDCProvider, nonce: str = NONCE) -> Any:
    return await provider.exchange(
        code="the-code", redirect_uri=REDIRECT_URI, code_verifier="v" * 64, nonce=nonce
    )


async def test_an_es256_id_token_is_accepted_and_the_client_authenticates_with_basic(fake, session):
    identity = await exchange(provider_for(fake, session))
    assert (identity.subject, identity.email, identity.email_verified) == (
        "subject-1",
        "ec@example.com",
        True,
    )
    ((headers, form),) = fake.token_requests
    assert form == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": REDIRECT_URI,
        "code_verifier": "v" * 64,
    }
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    # RFC 6749 2.3.1: each part form-urlencoded first.
    assert base64.b64decode(encoded).decode() == "referral-system:s3cret%2Fwith%2Bodd%3Achars"


async def test_an_rs256_key_works_too(fake, session):
    fake.key = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
    fake.algorithm = "RS256"
    assert (await exchange(provider_for(fake, session))).subject == "subject-1"


async def test_client_secret_post_when_discovery_offers_only_that(fake, session):
    fake.discovery["token_endpoint_auth_methods_supported"] = ["client_secret_post", "private_key_jwt"]
    await exchange(provider_for(fake, session))
    ((headers, form),) = fake.token_requests
    assert "Authorization" not in headers
    assert (form["client_id"], form["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)


async def test_email_from_userinfo_when_the_id_token_has_none(fake, session):
    fake.claims = {"email": None, "email_verified": None}
    fake.userinfo = {"sub": "subject-1", "email": "info@example.com", "email_verified": True}
    identity = await exchange(provider_for(fake, session))
    assert (identity.email, identity.email_verified) == ("info@example.com", True)
    assert fake.userinfo_auth == [f"Bearer {ACCESS_TOKEN}"]


async def test_userinfo_for_another_subject_is_refused(fake, session):
    fake.claims = {"email": None}
    fake.userinfo = {"sub": "someone-else", "email": "info@example.com", "email_verified": True}
    with pytest.raises(ProviderError, match="subject"):
        await exchange(provider_for(fake, session))


async def test_a_rotated_key_is_found_by_refetching_the_jwks(fake, session):
    provider = provider_for(fake, session, min_jwks_refresh=0)
    await exchange(provider)
    assert fake.jwks_fetches == 1
    await exchange(provider)
    assert fake.jwks_fetches == 1, "a known kid needs no fetch"
    old = fake.key
    fake.key = ECKey.generate_key("P-256", parameters={"kid": "ec-2"}, private=True)
    fake.published = [fake.key, old]
    assert (await exchange(provider)).subject == "subject-1"
    assert fake.jwks_fetches == 2


async def test_a_kid_that_is_not_published_is_refused(fake, session):
    provider = provider_for(fake, session)
    fake.published = [ECKey.generate_key("P-256", parameters={"kid": "other"}, private=True)]
    with pytest.raises(ProviderError, match="unknown signing key"):
        await exchange(provider)


async def test_a_token_signed_by_an_unpublished_key_with_a_published_kid_is_refused(fake, session):
    fake.published = [ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True)]
    with pytest.raises(ProviderError, match="signature"):
        await exchange(provider_for(fake, session))


async def test_an_hmac_token_is_refused(fake, session):
    """HS256 keyed with something public is the classic confusion attack: never accepted."""
    fake.key = OctKey.generate_key(256, parameters={"kid": "hmac"})
    fake.algorithm = "HS256"
    fake.published = [ECKey.generate_key("P-256", parameters={"kid": "hmac"}, private=True)]
    with pytest.raises(ProviderError, match="algorithm not allowed"):
        await exchange(provider_for(fake, session))


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"iss": "https://evil.example.com"}, "iss", id="issuer"),
        pytest.param({"aud": "someone-else"}, "aud", id="audience"),
        pytest.param({"aud": [CLIENT_ID, "someone-else"]}, "azp", id="several-audiences-no-azp"),
        pytest.param({"aud": [CLIENT_ID, "x"], "azp": "x"}, "azp", id="azp-of-another"),
        pytest.param({"exp": int(time.time()) - 3600}, "exp", id="expired"),
        pytest.param({"iat": int(time.time()) + 3600}, "iat", id="issued-in-the-future"),
        pytest.param({"nbf": int(time.time()) + 3600}, "nbf", id="not-yet-valid"),
        pytest.param({"nonce": None}, "nonce", id="no-nonce"),
        pytest.param({"sub": None}, "sub", id="no-subject"),
    ],
)
async def test_claims_are_checked(fake, session, claims, reason):
    fake.claims = claims
    with pytest.raises(ProviderError, match=reason):
        await exchange(provider_for(fake, session))


async def test_several_audiences_with_our_azp_are_accepted(fake, session):
    fake.claims = {"aud": [CLIENT_ID, "x"], "azp": CLIENT_ID}
    assert (await exchange(provider_for(fake, session))).subject == "subject-1"


@pytest.mark.parametrize(
    ("discovery", "reason"),
    [
        pytest.param({"issuer": "https://elsewhere.example.com"}, "issuer", id="issuer-mismatch"),
        pytest.param({"id_token_signing_alg_values_supported": ["HS256", "none"]}, "algorithm", id="no-alg"),
        pytest.param(
            {"token_endpoint_auth_methods_supported": ["private_key_jwt"]}, "client auth", id="auth"
        ),
        pytest.param({"jwks_uri": None}, "jwks_uri", id="no-jwks"),
    ],
)
async def test_an_unusable_discovery_document_is_refused(fake, session, discovery, reason):
    fake.discovery = discovery
    with pytest.raises(ProviderError, match=reason):
        await provider_for(fake, session).metadata()


async def test_discovery_algorithms_pin_the_id_token_algorithm(fake, session):
    fake.discovery = {"id_token_signing_alg_values_supported": ["RS256"]}
    with pytest.raises(ProviderError, match="algorithm not allowed"):
        await exchange(provider_for(fake, session))  # the token is ES256


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        pytest.param(
            400,
            {"error": "invalid_grant", "error_description": "code abc123 used"},
            "invalid_grant",
            id="400",
        ),
        pytest.param(503, {"oops": True}, "HTTP 503", id="503"),
        pytest.param(200, {"token_type": "Bearer"}, "no access_token", id="no-access-token"),
        pytest.param(200, {"access_token": "a", "token_type": "Bearer"}, "no id_token", id="no-id-token"),
    ],
)
async def test_token_endpoint_failures(fake, session, status, body, reason):
    fake.token_status, fake.token_body = status, body
    with pytest.raises(ProviderError, match=reason) as caught:
        await exchange(provider_for(fake, session))
    assert "abc123" not in caught.value.reason


async def test_a_slow_provider_hits_the_deadline(fake, session):
    fake.token_delay = 3
    provider = provider_for(fake, session, timeout=0.5)
    await provider.metadata()
    started = time.monotonic()
    with pytest.raises(ProviderError, match="in time"):
        await exchange(provider)
    assert time.monotonic() - started < 1.5


# --- the shared JWT check (shared.jose) as the sign-in uses it ----------------------------------------


def rsa_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid}, private=True)


async def test_an_unknown_kid_refetches_the_jwks_once_per_interval(fake, session):
    provider = provider_for(fake, session, min_jwks_refresh=0.3)
    await exchange(provider)
    assert fake.jwks_fetches == 1
    published = fake.key
    fake.key = ECKey.generate_key("P-256", parameters={"kid": "ec-unpublished"}, private=True)
    fake.published = [published]
    await asyncio.sleep(0.35)  # the interval since the first fetch has passed
    with pytest.raises(ProviderError, match="unknown signing key"):
        await exchange(provider)
    assert fake.jwks_fetches == 2, "an unknown kid fetches the JWKS again, once"
    for _ in range(3):
        with pytest.raises(ProviderError, match="unknown signing key"):
            await exchange(provider)
    assert fake.jwks_fetches == 2, "no refetch within min_jwks_refresh"
    fake.published = [published, fake.key]  # now it is published
    await asyncio.sleep(0.35)
    assert (await exchange(provider)).subject == "subject-1"
    assert fake.jwks_fetches == 3


async def test_concurrent_sign_ins_with_a_new_kid_fetch_the_jwks_once(fake, session):
    provider = provider_for(fake, session, min_jwks_refresh=0)
    await exchange(provider)
    old = fake.key
    fake.key = ECKey.generate_key("P-256", parameters={"kid": "ec-2"}, private=True)
    fake.published = [fake.key, old]
    identities = await asyncio.gather(*(exchange(provider) for _ in range(5)))
    assert {identity.subject for identity in identities} == {"subject-1"}
    assert fake.jwks_fetches == 2


@pytest.mark.parametrize("algorithm", ["RS384", "RS512", "PS384"])
async def test_an_algorithm_outside_the_accepted_list_is_refused(fake, session, algorithm):
    """Validly signed with the published key, and offered by discovery, but not one we accept."""
    fake.key, fake.algorithm = rsa_key("rsa-1"), algorithm
    fake.discovery = {"id_token_signing_alg_values_supported": ["RS256", algorithm]}
    with pytest.raises(ProviderError, match="algorithm not allowed"):
        await exchange(provider_for(fake, session))


async def test_ps256_is_accepted_when_discovery_offers_it(fake, session):
    fake.key, fake.algorithm = rsa_key("rsa-1"), "PS256"
    fake.discovery = {"id_token_signing_alg_values_supported": ["PS256"]}
    assert (await exchange(provider_for(fake, session))).subject == "subject-1"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_an_unsigned_id_token_is_refused(fake, session, alg):
    _, payload, _ = fake.id_token().split(".")
    fake.token_body = {
        "access_token": ACCESS_TOKEN,
        "token_type": "Bearer",
        "id_token": f"{b64url(json.dumps({'alg': alg, 'kid': fake.key.kid}).encode())}.{payload}.",
    }
    with pytest.raises(ProviderError, match="algorithm not allowed"):
        await exchange(provider_for(fake, session))
    assert fake.jwks_fetches == 0, "refused before any key is looked up"


async def test_an_algorithm_that_does_not_fit_the_key_is_refused(fake, session):
    """ES256 is accepted, but the kid names an RSA key: the signature cannot be one of its."""
    fake.published = [rsa_key(fake.key.kid)]
    with pytest.raises(ProviderError, match="signature"):
        await exchange(provider_for(fake, session))


async def test_without_a_kid_the_only_published_key_is_used(fake, session):
    fake.header = {"kid": None}
    assert (await exchange(provider_for(fake, session))).subject == "subject-1"


async def test_without_a_kid_and_several_keys_the_token_is_refused(fake, session):
    fake.header = {"kid": None}
    fake.published = [fake.key, ECKey.generate_key("P-256", parameters={"kid": "ec-2"}, private=True)]
    with pytest.raises(ProviderError, match="no kid and not exactly one signing key"):
        await exchange(provider_for(fake, session))


async def test_a_jwks_the_provider_cannot_serve_is_named(fake, session):
    fake.jwks_status = 500
    with pytest.raises(ProviderError, match="JWKS: HTTP 500"):
        await exchange(provider_for(fake, session))


async def test_a_large_id_token_is_read(fake, session):
    """ID tokens may carry many claims (groups, roles): larger than any access token we accept."""
    fake.claims = {"groups": [f"group-{i:05d}" for i in range(1000)]}
    assert len(fake.id_token()) > 10_000
    assert (await exchange(provider_for(fake, session))).subject == "subject-1"


async def test_a_subject_longer_than_255_characters_is_refused(fake, session):
    fake.claims = {"sub": "s" * 256}
    with pytest.raises(ProviderError, match="sub"):
        await exchange(provider_for(fake, session))
