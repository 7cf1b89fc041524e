"""OIDCProvider against a real OpenID Connect provider (oidc-provider-mock in a subprocess)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from services.auth.adapters.oauth.providers import OIDCProvider, ProviderError, new_pkce
from tests.auth.oauth.helpers import (
    CLIENT_ID,
    REDIRECT_URI,
    MockProvider,
    b64url,
    b64url_json,
    free_port,
    oidc_settings,
    running_mock_provider,
    sign_in_at_provider,
)


def nonce() -> str:
    return secrets.token_urlsafe(16)


async def start_flow(provider: OIDCProvider, flow_nonce: str) -> tuple[str, str, str]:
    """(authorization URL, state, code_verifier) of a fresh flow."""
    verifier, challenge = new_pkce()
    state = secrets.token_urlsafe(32)
    url = await provider.authorization_url(
        redirect_uri=REDIRECT_URI, state=state, code_challenge=challenge, nonce=flow_nonce
    )
    return url, state, verifier


async def code_for(
    provider: OIDCProvider, session: aiohttp.ClientSession, sub: str, claims: dict[str, Any] | None, n: str
) -> tuple[str, str]:
    """A fresh authorization code for `sub` (with those claims) and the flow's code_verifier."""
    url, state, verifier = await start_flow(provider, n)
    code, returned_state = await sign_in_at_provider(session, url, sub, claims)
    assert returned_state == state
    return code, verifier


@pytest.fixture
def provider(mock_provider: MockProvider, session: aiohttp.ClientSession) -> OIDCProvider:
    return OIDCProvider(oidc_settings(mock_provider.issuer), session)


async def test_discovery_is_loaded_and_checked(provider, mock_provider):
    metadata = await provider.metadata()
    assert metadata.issuer == mock_provider.issuer
    assert metadata.authorization_endpoint == f"{mock_provider.issuer}/oauth2/authorize"
    assert metadata.token_endpoint == f"{mock_provider.issuer}/oauth2/token"
    assert metadata.jwks_uri == f"{mock_provider.issuer}/jwks"
    assert metadata.algorithms == ("RS256",)
    assert metadata.client_auth == "client_secret_basic"
    assert await provider.metadata() is metadata, "cached"


async def test_authorization_url_carries_the_flow(provider, mock_provider):
    verifier, challenge = new_pkce()
    assert 43 <= len(verifier) <= 128
    url = URL(
        await provider.authorization_url(
            redirect_uri=REDIRECT_URI, state="the-state", code_challenge=challenge, nonce="the-nonce"
        )
    )
    assert str(url.with_query(None)) == f"{mock_provider.issuer}/oauth2/authorize"
    assert dict(url.query) == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email profile",
        "state": "the-state",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "nonce": "the-nonce",
    }


async def test_the_whole_dance_gives_the_identity(provider, session):
    sub = f"user-{secrets.token_hex(4)}"
    n = nonce()
    code, verifier = await code_for(
        provider, session, sub, {"email": "Jane@Example.com", "email_verified": True}, n
    )
    identity = await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert identity.subject == sub
    assert identity.email == "Jane@Example.com"
    assert identity.email_verified is True


async def test_an_unverified_email_is_reported_unverified(provider, session):
    n = nonce()
    sub = f"user-{secrets.token_hex(4)}"
    code, verifier = await code_for(
        provider, session, sub, {"email": "u@example.com", "email_verified": False}, n
    )
    identity = await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert (identity.subject, identity.email, identity.email_verified) == (sub, "u@example.com", False)


async def test_no_email_at_all_is_refused(provider, session):
    """Neither the ID token nor the userinfo endpoint has an email (the fallback is asked and fails)."""
    n = nonce()
    code, verifier = await code_for(provider, session, f"user-{secrets.token_hex(4)}", {"name": "No Mail"}, n)
    with pytest.raises(ProviderError, match="no email"):
        await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)


async def test_a_code_used_twice_is_refused(provider, session):
    n = nonce()
    code, verifier = await code_for(provider, session, "twice", {"email": "t@example.com"}, n)
    await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    with pytest.raises(ProviderError, match="invalid_grant") as caught:
        await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert code not in caught.value.reason


async def test_a_wrong_code_is_refused(provider, session):
    n = nonce()
    await provider.metadata()
    with pytest.raises(ProviderError, match="invalid_grant"):
        await provider.exchange(code="not-a-code", redirect_uri=REDIRECT_URI, code_verifier="v" * 43, nonce=n)


async def test_a_nonce_mismatch_is_refused(provider, session):
    n = nonce()
    code, verifier = await code_for(provider, session, "nonce-user", {"email": "n@example.com"}, n)
    with pytest.raises(ProviderError, match="nonce"):
        await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=nonce())


async def test_a_closed_port_as_issuer_fails_quickly(session):
    provider = OIDCProvider(oidc_settings(f"http://127.0.0.1:{free_port()}"), session)
    started = time.monotonic()
    with pytest.raises(ProviderError, match="unreachable"):
        await provider.authorization_url(redirect_uri=REDIRECT_URI, state="s", code_challenge="c", nonce="n")
    with pytest.raises(ProviderError, match="unreachable"):
        await provider.exchange(code="c", redirect_uri=REDIRECT_URI, code_verifier="v" * 43, nonce="n")
    assert time.monotonic() - started < 2


async def test_a_provider_that_stopped_fails_quickly(session, tmp_path):
    with running_mock_provider(tmp_path / "provider.log") as stopping:
        provider = OIDCProvider(oidc_settings(stopping.issuer), session)
        n = nonce()
        code, verifier = await code_for(provider, session, "gone", {"email": "g@example.com"}, n)
    started = time.monotonic()
    with pytest.raises(ProviderError, match="unreachable"):
        await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert time.monotonic() - started < 2


# --- ID tokens altered on the way: a forwarding server in front of the whole provider -------------


@dataclass
class Forwarder:
    """Forwards every request to the provider, keeping the Host header, so the provider names its
    endpoints and its issuer after the forwarder; token answers pass through `alter_id_token`, the
    discovery document takes `discovery_changes`, and token requests are kept (headers, form)."""

    upstream: str
    alter_id_token: Callable[[str], str] | None = None
    discovery_changes: dict[str, Any] = field(default_factory=dict)
    seen_id_tokens: list[str] = field(default_factory=list)
    token_requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    url: str = ""


_PASSED_HEADERS = ("Content-Type", "Location", "Cache-Control", "Pragma")


async def start_forwarder(aiohttp_server: Any, forwarder: Forwarder) -> Forwarder:
    async def client_ctx(app: web.Application) -> Any:
        async with aiohttp.ClientSession(auto_decompress=True) as client:
            app[CLIENT] = client
            yield

    async def forward(request: web.Request) -> web.Response:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "connection")
        }
        if request.path == "/oauth2/token":
            form = {k: str(v) for k, v in (await request.post()).items()}
            forwarder.token_requests.append((dict(request.headers), form))
        async with request.app[CLIENT].request(
            request.method,
            URL(forwarder.upstream + request.path_qs, encoded=True),
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            status = upstream.status
            passed = {name: upstream.headers[name] for name in _PASSED_HEADERS if name in upstream.headers}
        if request.path == "/oauth2/token" and status == 200:
            document = json.loads(body)
            forwarder.seen_id_tokens.append(document["id_token"])
            if forwarder.alter_id_token is not None:
                document["id_token"] = forwarder.alter_id_token(document["id_token"])
            body = json.dumps(document).encode()
        if request.path == "/.well-known/openid-configuration" and status == 200:
            body = json.dumps(json.loads(body) | forwarder.discovery_changes).encode()
        return web.Response(status=status, body=body, headers=passed)

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    server = await aiohttp_server(app)
    forwarder.url = str(server.make_url("")).rstrip("/")
    return forwarder


CLIENT = web.AppKey("client", aiohttp.ClientSession)


@pytest.fixture
async def forwarder(aiohttp_server, mock_provider) -> Forwarder:
    return await start_forwarder(aiohttp_server, Forwarder(mock_provider.issuer))


def forwarded(forwarder: Forwarder, session: aiohttp.ClientSession, **changes: Any) -> OIDCProvider:
    return OIDCProvider(oidc_settings(forwarder.url, **changes), session)


async def test_through_the_forwarder_untouched_tokens_are_accepted(forwarder, session):
    """The control for the tampering tests: the forwarding path itself works."""
    provider = forwarded(forwarder, session)
    assert (await provider.metadata()).token_endpoint == f"{forwarder.url}/oauth2/token"
    n = nonce()
    code, verifier = await code_for(
        provider, session, "fwd", {"email": "f@example.com", "email_verified": True}, n
    )
    identity = await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert (identity.subject, identity.email) == ("fwd", "f@example.com")
    assert len(forwarder.seen_id_tokens) == 1


def flip_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    replacement = "A" if signature[middle] != "A" else "B"
    return f"{header}.{payload}.{signature[:middle]}{replacement}{signature[middle + 1 :]}"


def change_email(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = b64url_json(payload)
    claims["email"] = "attacker@example.com"
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def unsigned(token: str) -> str:
    _, payload, _ = token.split(".")
    return f"{b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}."


@pytest.mark.parametrize(
    ("alter", "reason"),
    [
        pytest.param(flip_signature, "signature", id="signature-altered"),
        pytest.param(change_email, "signature", id="claims-altered"),
        pytest.param(unsigned, "algorithm not allowed", id="alg-none"),
    ],
)
async def test_a_tampered_id_token_is_refused(forwarder, session, alter, reason):
    forwarder.alter_id_token = alter
    provider = forwarded(forwarder, session)
    n = nonce()
    code, verifier = await code_for(provider, session, "victim", {"email": "v@example.com"}, n)
    with pytest.raises(ProviderError, match=reason):
        await provider.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=n)
    assert len(forwarder.seen_id_tokens) == 1, "the token endpoint was reached through the forwarder"


async def test_an_id_token_for_another_client_is_refused(forwarder, session):
    """A genuine, validly signed ID token issued to another client, swapped in on the way."""
    other = forwarded(forwarder, session, client_id="another-client")
    other_nonce = nonce()
    code, verifier = await code_for(other, session, "victim", {"email": "v@example.com"}, other_nonce)
    await other.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=other_nonce)
    (foreign_token,) = forwarder.seen_id_tokens
    assert b64url_json(foreign_token.split(".")[1])["aud"] in ("another-client", ["another-client"])

    forwarder.alter_id_token = lambda _token: foreign_token
    ours = forwarded(forwarder, session)
    code, verifier = await code_for(ours, session, "victim", None, nonce())
    # The nonce given is the foreign token's, so that only the audience is wrong.
    with pytest.raises(ProviderError, match="aud"):
        await ours.exchange(code=code, redirect_uri=REDIRECT_URI, code_verifier=verifier, nonce=other_nonce)
