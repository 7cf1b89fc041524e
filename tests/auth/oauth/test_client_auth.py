"""How the OpenID Connect client authenticates at the token endpoint: the method chosen from discovery
and the configured secret, what goes on the wire for each, public clients end to end, refusals."""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
from authlib.oauth2.rfc6749.util import extract_basic_authorization
from yarl import URL

from services.auth.adapters.oauth.providers import OIDCProvider, ProviderError
from tests.auth.oauth.helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    REDIRECT_URI,
    MockProvider,
    oidc_settings,
    sign_in_at_provider,
)
from tests.auth.oauth.test_oidc_fake import FakeOIDC, exchange, provider_for, start_fake
from tests.auth.oauth.test_oidc_mock import Forwarder, code_for, nonce, start_forwarder
from tests.helpers import assert_problem

METHODS = "token_endpoint_auth_methods_supported"
BASIC, POST, NONE = "client_secret_basic", "client_secret_post", "none"
MISSING = object()  # the discovery document leaves the field out
PROVIDERS_LOGGER = "services.auth.adapters.oauth.providers"


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeOIDC:
    return await start_fake(aiohttp_server, FakeOIDC())


def offering(fake: FakeOIDC, methods: Any) -> FakeOIDC:
    if methods is not MISSING:
        fake.discovery[METHODS] = methods
    return fake


def the_token_request(fake: FakeOIDC) -> tuple[dict[str, str], dict[str, str]]:
    ((headers, form),) = fake.token_requests
    return headers, form


BASE_FORM = {
    "grant_type": "authorization_code",
    "code": "the-code",
    "redirect_uri": REDIRECT_URI,
    "code_verifier": "v" * 64,
}


# --- the choice -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "secret", "chosen"),
    [
        pytest.param(MISSING, True, BASIC, id="missing-means-basic"),
        pytest.param(None, True, BASIC, id="null-means-basic"),
        pytest.param([BASIC], True, BASIC, id="basic"),
        pytest.param([POST, BASIC], True, BASIC, id="basic-preferred-to-post"),
        pytest.param(["private_key_jwt", POST], True, POST, id="post-unknown-ignored"),
        pytest.param([NONE, POST], True, POST, id="post-preferred-to-none"),
        pytest.param([NONE], True, NONE, id="secret-but-only-none"),
        pytest.param([NONE], False, NONE, id="public-client"),
        pytest.param([BASIC, POST, NONE], False, NONE, id="public-client-among-others"),
        pytest.param(["private_key_jwt", "tls_client_auth", NONE], False, NONE, id="public-unknown-ignored"),
    ],
)
async def test_the_method_follows_discovery_and_the_secret(fake, session, methods, secret, chosen):
    provider = provider_for(offering(fake, methods), session, client_secret=CLIENT_SECRET if secret else None)
    assert (await provider.metadata()).client_auth == chosen


@pytest.mark.parametrize(
    ("methods", "secret", "reason"),
    [
        pytest.param(
            ["private_key_jwt"],
            True,
            "no supported client authentication method (client_secret_basic, client_secret_post or none);"
            " the provider offers private_key_jwt",
            id="only-private-key-jwt",
        ),
        pytest.param(
            ["private_key_jwt"],
            False,
            "the provider offers private_key_jwt",
            id="only-private-key-jwt-no-secret",
        ),
        pytest.param(
            MISSING,
            False,
            "no client secret is configured and the provider does not accept public clients"
            " (token endpoint authentication method none); it offers client_secret_basic",
            id="missing-means-basic-which-needs-a-secret",
        ),
        pytest.param(
            [POST, "private_key_jwt"],
            False,
            "no client secret is configured",
            id="post-needs-a-secret",
        ),
        pytest.param([], True, "the provider offers nothing usable", id="empty"),
        pytest.param(NONE, False, "token_endpoint_auth_methods_supported is not a list", id="not-a-list"),
    ],
)
async def test_a_provider_with_no_usable_method_is_refused_with_the_reason(
    fake, session, methods, secret, reason
):
    provider = provider_for(offering(fake, methods), session, client_secret=CLIENT_SECRET if secret else None)
    with pytest.raises(ProviderError) as caught:
        await provider.metadata()
    assert reason in caught.value.reason
    with pytest.raises(ProviderError):
        await exchange(provider)
    assert fake.token_requests == [], "nothing is sent to a token endpoint the client cannot use"


async def test_what_a_refusal_names_is_only_method_like_and_short(fake, session):
    fake.discovery[METHODS] = ["<script>", "x" * 100, 7, *[f"method_{c}" for c in "abcdefgh"]]
    with pytest.raises(ProviderError) as caught:
        await provider_for(fake, session).metadata()
    assert caught.value.reason.endswith(
        "offers method_a, method_b, method_c, method_d, method_e, method_f, ..."
    )


# --- what goes on the wire ------------------------------------------------------------------------


async def test_a_public_client_sends_its_client_id_and_nothing_secret(fake, session):
    fake.discovery[METHODS] = [NONE]
    fake.accepts = NONE
    identity = await exchange(provider_for(fake, session, client_secret=None))
    assert identity.subject == "subject-1"
    headers, form = the_token_request(fake)
    assert form == {**BASE_FORM, "client_id": CLIENT_ID}
    assert "Authorization" not in headers


async def test_a_configured_secret_is_not_sent_to_a_provider_that_takes_only_public_clients(
    fake, session, caplog
):
    fake.discovery[METHODS] = [NONE]
    fake.accepts = NONE
    provider = provider_for(fake, session, metadata_max_age=0)
    with caplog.at_level(logging.WARNING, logger=PROVIDERS_LOGGER):
        await exchange(provider)
        await exchange(provider)  # the discovery document is read again: no second warning
    for headers, form in fake.token_requests:
        assert form == {**BASE_FORM, "client_id": CLIENT_ID}
        assert "Authorization" not in headers
    (warning,) = [r for r in caplog.records if r.name == PROVIDERS_LOGGER]
    assert "accepts only public clients" in warning.getMessage()
    assert "client secret is not sent" in warning.getMessage()
    assert CLIENT_SECRET not in caplog.text


async def test_client_secret_post_sends_both_in_the_form_and_no_header(fake, session):
    fake.discovery[METHODS] = [POST, NONE]
    fake.accepts = POST
    await exchange(provider_for(fake, session))
    headers, form = the_token_request(fake)
    assert form == {**BASE_FORM, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    assert "Authorization" not in headers


@pytest.mark.parametrize("methods", [MISSING, [BASIC, POST, NONE]], ids=["missing", "offered"])
async def test_client_secret_basic_sends_the_header_only(fake, session, methods):
    offering(fake, methods).accepts = BASIC
    await exchange(provider_for(fake, session))
    headers, form = the_token_request(fake)
    assert form == BASE_FORM
    assert headers["Authorization"].startswith("Basic ")


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [
        pytest.param(CLIENT_ID, "a:b+c%d e", id="colon-plus-percent-space"),
        pytest.param("urn:client id+1%", "p@ss w:rd+%2B/é~", id="odd-client-id-too"),
    ],
)
async def test_basic_credentials_are_form_urlencoded_before_base64(fake, session, client_id, secret):
    """RFC 6749 2.3.1: each part form-urlencoded, then joined by `:` and base64-encoded."""
    fake.claims = {"aud": client_id}
    await exchange(provider_for(fake, session, client_id=client_id, client_secret=secret))
    headers, _ = the_token_request(fake)
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    decoded = base64.b64decode(encoded).decode("ascii")
    assert decoded.count(":") == 1, "a `:` inside either part is encoded, so the split is unambiguous"
    sent_id, sent_secret = decoded.split(":")
    # A form decoder (application/x-www-form-urlencoded: `+` is a space) gets both back exactly ...
    assert (unquote_plus(sent_id), unquote_plus(sent_secret)) == (client_id, secret)
    # ... and so does a server that only percent-decodes (authlib's, under oidc-provider-mock).
    assert extract_basic_authorization(headers) == (client_id, secret)


# --- through the auth API ---------------------------------------------------------------------------

AUTHORIZE = "/api/v1/auth/oauth/mock/authorize"
CALLBACK = "/api/v1/auth/oauth/mock/callback"


async def test_a_public_client_signs_in_end_to_end(make_auth_client, fake, session, db):
    """A provider offering only `none`, no client secret configured: authorize -> callback -> user."""
    fake.discovery[METHODS] = [NONE]
    fake.accepts = NONE  # the fake refuses any other method, and checks PKCE S256 on the code
    fake.claims = {"email": "public@example.com", "email_verified": True}
    client = await make_auth_client(oauth=(oidc_settings(fake.url, client_secret=None),))

    started = await client.get(AUTHORIZE, allow_redirects=False)
    assert started.status == 302, await started.text()
    location = URL(started.headers["Location"])
    assert str(location.with_query(None)) == f"{fake.url}/authorize"
    assert location.query["code_challenge_method"] == "S256"
    async with session.get(str(location), allow_redirects=False) as consent:
        assert consent.status == 302
        back = URL(consent.headers["Location"])
    assert str(back.with_query(None)) == REDIRECT_URI

    response = await client.get(CALLBACK, params={"code": back.query["code"], "state": back.query["state"]})
    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["user"]["email"] == "public@example.com"
    with db.cursor() as cursor:
        cursor.execute("SELECT provider, subject, user_id::text FROM auth.identities")
        assert cursor.fetchall() == [("mock", "subject-1", body["user"]["id"])]

    headers, form = the_token_request(fake)
    assert form["client_id"] == CLIENT_ID
    assert "client_secret" not in form
    assert "Authorization" not in headers
    assert form["code_verifier"], "PKCE as always (the fake checked it against the challenge)"


async def test_authorize_refuses_a_provider_the_client_cannot_authenticate_at(
    make_auth_client, fake, db, caplog
):
    """No secret configured and a provider for confidential clients only: 400, the reason logged."""
    fake.discovery[METHODS] = [BASIC, POST]
    client = await make_auth_client(oauth=(oidc_settings(fake.url, client_secret=None),))
    with caplog.at_level(logging.WARNING, logger="services.auth.domain.oauth"):
        response = await client.get(AUTHORIZE, allow_redirects=False)
    await assert_problem(response, 400, "oauth_failed")
    assert "provider mock unavailable at authorize" in caplog.text
    assert "no client secret is configured" in caplog.text
    assert fake.grants == {}


# --- against the real provider (oidc-provider-mock, which checks the method of a registered client) --
# Its token endpoint takes only client_secret_basic and client_secret_post (authlib's authorization
# code grant), so `none` is covered by the fake above.


async def register_client(mock: MockProvider, session: aiohttp.ClientSession, method: str) -> tuple[str, str]:
    body = {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": method}
    async with session.post(f"{mock.issuer}/oauth2/clients", json=body) as response:
        assert response.status == 201, await response.text()
        registered = await response.json()
    return registered["client_id"], registered["client_secret"]


@pytest.mark.parametrize(
    ("offered", "registered", "sent"),
    [
        pytest.param({METHODS: [POST]}, POST, POST, id="post"),
        pytest.param({}, BASIC, BASIC, id="missing-means-basic"),
        pytest.param({METHODS: [POST, BASIC]}, BASIC, BASIC, id="basic-preferred"),
    ],
)
async def test_the_real_provider_accepts_the_method_chosen(
    aiohttp_server, mock_provider, session, offered, registered, sent
):
    forwarder = await start_forwarder(
        aiohttp_server, Forwarder(mock_provider.issuer, discovery_changes=offered)
    )
    client_id, secret = await register_client(mock_provider, session, registered)
    provider = OIDCProvider(oidc_settings(forwarder.url, client_id=client_id, client_secret=secret), session)
    n = nonce()
    code, verifier = await code_for(provider, session, "registered", {"email": "r@example.com"}, n)
    identity = await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert identity.subject == "registered"
    ((headers, form),) = forwarder.token_requests
    assert ("Authorization" in headers, "client_secret" in form) == (sent == BASIC, sent == POST)


async def test_the_real_provider_refuses_a_method_its_client_was_not_registered_for(
    aiohttp_server, mock_provider, session
):
    """The control: a post-only client, while discovery (missing field) has us use basic."""
    forwarder = await start_forwarder(aiohttp_server, Forwarder(mock_provider.issuer))
    client_id, secret = await register_client(mock_provider, session, POST)
    provider = OIDCProvider(oidc_settings(forwarder.url, client_id=client_id, client_secret=secret), session)
    n = nonce()
    url = await provider.authorization_url(
        redirect_uri=REDIRECT_URI, state="s", code_challenge="c" * 43, nonce=n
    )
    code, _ = await sign_in_at_provider(session, url, "registered", {"email": "r@example.com"})
    with pytest.raises(ProviderError, match="invalid_client"):
        await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier="v" * 43, nonce=n)
