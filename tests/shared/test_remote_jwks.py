"""RemoteJWKS + TokenVerifier against a real JWKS server on loopback, and the verifier's refusals."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc import jwt
from joserfc.jwk import ECKey

from services.auth.adapters.signing import AccessTokenIssuer, KeyRing, generate_pem, parse_key_ring
from shared.jose import RemoteJWKS, StaticKeySource
from shared.problems import InvalidToken
from shared.tokens import TokenVerifier

ISSUER = "http://127.0.0.1:8080/api/v1/auth"
AUDIENCE = "referral-system"


@pytest.fixture(scope="module")
def ring_a() -> KeyRing:
    return parse_key_ring(generate_pem())


@pytest.fixture(scope="module")
def ring_b() -> KeyRing:
    return parse_key_ring(generate_pem())


@pytest.fixture(scope="module")
def ring_unpublished() -> KeyRing:
    return parse_key_ring(generate_pem())


def issuer_for(ring: KeyRing, *, issuer: str = ISSUER, audience: str = AUDIENCE) -> AccessTokenIssuer:
    return AccessTokenIssuer(ring, issuer=issuer, audience=audience, ttl=900)


def token_for(ring: KeyRing, subject: uuid.UUID | None = None, **issue: Any) -> str:
    return issuer_for(ring).issue(subject or uuid.uuid4(), email="jane@example.com", **issue).token


@dataclass
class JwksServer:
    """What the fake auth service publishes, and how it behaves."""

    url: str = ""
    document: Any = field(default_factory=lambda: {"keys": []})
    status: int = 200
    delay: float = 0.0
    raw: bytes | None = None
    requests: int = 0

    def publish(self, *rings: KeyRing) -> None:
        self.document = {"keys": [key for ring in rings for key in ring.jwks()["keys"]]}


@pytest.fixture
async def jwks_server(aiohttp_server: Any) -> JwksServer:
    state = JwksServer()

    async def handler(_: web.Request) -> web.Response:
        state.requests += 1
        if state.delay:
            await asyncio.sleep(state.delay)
        if state.raw is not None:
            return web.Response(body=state.raw, status=state.status, content_type="application/json")
        return web.json_response(state.document, status=state.status)

    app = web.Application()
    app.router.add_get("/api/v1/auth/.well-known/jwks.json", handler)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/api/v1/auth/.well-known/jwks.json"))
    return state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def verifier(keys: Any) -> TokenVerifier:
    return TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)


# --- RemoteJWKS ----------------------------------------------------------------------------------


async def test_a_token_verifies_and_the_jwks_is_cached(jwks_server, session, ring_a):
    jwks_server.publish(ring_a)
    check = verifier(RemoteJWKS(jwks_server.url, session))
    subject = uuid.uuid4()
    token = token_for(ring_a, subject)
    claims = await check.verify(token)
    assert claims.user_id == subject
    assert claims.email == "jane@example.com"
    assert claims.expires_at > time.time()
    assert claims.token_id
    for _ in range(5):
        await check.verify(token_for(ring_a))
    assert jwks_server.requests == 1


async def test_a_rotated_key_is_fetched_once(jwks_server, session, ring_a, ring_b):
    jwks_server.publish(ring_a)
    check = verifier(RemoteJWKS(jwks_server.url, session, min_refresh_interval=0.1))
    await check.verify(token_for(ring_a))
    assert jwks_server.requests == 1
    await asyncio.sleep(0.15)
    jwks_server.publish(ring_b, ring_a)  # the new key first, the old one kept
    subject = uuid.uuid4()
    assert (await check.verify(token_for(ring_b, subject))).user_id == subject
    assert jwks_server.requests == 2
    await check.verify(token_for(ring_b))
    await check.verify(token_for(ring_a))
    assert jwks_server.requests == 2


async def test_concurrent_unknown_kids_cause_one_fetch(jwks_server, session, ring_a):
    jwks_server.publish(ring_a)
    jwks_server.delay = 0.2
    check = verifier(RemoteJWKS(jwks_server.url, session))
    tokens = [token_for(ring_a) for _ in range(25)]
    results = await asyncio.gather(*(check.verify(t) for t in tokens))
    assert len(results) == 25
    assert jwks_server.requests == 1


async def test_concurrent_unknown_kids_after_a_rotation_cause_one_fetch(jwks_server, session, ring_a, ring_b):
    jwks_server.publish(ring_a)
    check = verifier(RemoteJWKS(jwks_server.url, session, min_refresh_interval=0.1))
    await check.verify(token_for(ring_a))
    await asyncio.sleep(0.15)
    jwks_server.publish(ring_b)
    jwks_server.delay = 0.2
    results = await asyncio.gather(*(check.verify(token_for(ring_b)) for _ in range(25)))
    assert len(results) == 25
    assert jwks_server.requests == 2


async def test_a_still_unknown_kid_is_invalid_without_a_refetch_storm(
    jwks_server, session, ring_a, ring_unpublished
):
    jwks_server.publish(ring_a)
    check = verifier(RemoteJWKS(jwks_server.url, session, min_refresh_interval=0.5))
    await check.verify(token_for(ring_a))
    assert jwks_server.requests == 1
    await asyncio.sleep(0.55)
    stranger = token_for(ring_unpublished)
    with pytest.raises(InvalidToken):
        await check.verify(stranger)
    assert jwks_server.requests == 2, "an unknown kid refetches once"
    for _ in range(20):
        with pytest.raises(InvalidToken):
            await check.verify(stranger)
    outcomes = await asyncio.gather(*(check.verify(stranger) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(o, InvalidToken) for o in outcomes), outcomes
    assert jwks_server.requests == 2, "no refetch within min_refresh_interval"
    await check.verify(token_for(ring_a))  # known keys keep working meanwhile
    await asyncio.sleep(0.55)
    with pytest.raises(InvalidToken):
        await check.verify(stranger)
    assert jwks_server.requests == 3, "after the interval it may ask again"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_server_that_is_down_means_invalid_token(session, ring_a):
    url = f"http://127.0.0.1:{_closed_port()}/api/v1/auth/.well-known/jwks.json"
    check = verifier(RemoteJWKS(url, session, timeout=1.0))
    started = time.monotonic()
    with pytest.raises(InvalidToken):
        await check.verify(token_for(ring_a))
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("status", "raw", "delay"),
    [
        (500, None, 0.0),
        (404, None, 0.0),
        (200, b"<html>not json</html>", 0.0),
        (200, b'{"keys": "nope"}', 0.0),
        (200, b"[1, 2, 3]", 0.0),
        (200, b'{"keys": [{"kty": "RSA", "kid": "x", "n": "!!", "e": "AQAB"}, 42, null]}', 0.0),
        (200, b"\xff\xfe\x00garbage", 0.0),
        (200, None, 1.0),
    ],
    ids=["500", "404", "html", "keys-not-list", "list", "bad-entries", "binary", "slow"],
)
async def test_a_broken_jwks_means_invalid_token(jwks_server, session, ring_a, status, raw, delay):
    jwks_server.publish(ring_a)
    jwks_server.status, jwks_server.raw, jwks_server.delay = status, raw, delay
    check = verifier(RemoteJWKS(jwks_server.url, session, timeout=0.3))
    with pytest.raises(InvalidToken):
        await check.verify(token_for(ring_a))
    assert jwks_server.requests == 1


async def test_known_keys_survive_a_failed_refresh(jwks_server, session, ring_a):
    jwks_server.publish(ring_a)
    check = verifier(RemoteJWKS(jwks_server.url, session, max_age=0.1, min_refresh_interval=0.05))
    await check.verify(token_for(ring_a))
    jwks_server.status = 503
    await asyncio.sleep(0.15)
    await check.verify(token_for(ring_a))  # stale keys are refreshed; the failure keeps the old ones
    assert jwks_server.requests == 2


async def test_keys_are_refetched_after_max_age(jwks_server, session, ring_a, ring_b):
    jwks_server.publish(ring_a)
    check = verifier(RemoteJWKS(jwks_server.url, session, max_age=0.1, min_refresh_interval=0.05))
    await check.verify(token_for(ring_a))
    await asyncio.sleep(0.15)
    jwks_server.publish(ring_b)  # ring_a withdrawn
    with pytest.raises(InvalidToken):
        await check.verify(token_for(ring_a))
    assert jwks_server.requests == 2


# --- TokenVerifier refusals ----------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(uuid.uuid4()),
        "email": "jane@example.com",
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(ring: KeyRing, header: dict[str, Any], body: dict[str, Any]) -> str:
    return jwt.encode(header, body, ring.signing_key, algorithms=["RS256"])


def signed_by_hand(ring: KeyRing, header: dict[str, Any], body: dict[str, Any]) -> str:
    """RS256 without joserfc's header checks, for headers it refuses to produce."""
    signing_input = f"{b64json(header)}.{b64json(body)}".encode("ascii")
    signature = ring.signing_key.raw_value.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64(signature)}"


def rs_header(ring: KeyRing, **changes: Any) -> dict[str, Any]:
    header = {"alg": "RS256", "typ": "at+jwt", "kid": ring.signing_key.kid}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


@pytest.fixture
def static_verifier(ring_a) -> TokenVerifier:
    return verifier(StaticKeySource(ring_a.public_keys))


async def test_a_well_formed_token_passes_the_static_verifier(static_verifier, ring_a):
    subject = uuid.uuid4()
    token = signed(ring_a, rs_header(ring_a), claims(sub=str(subject), scope="referrals:write internal"))
    result = await static_verifier.verify(token)
    assert result.user_id == subject
    assert result.scope == frozenset({"referrals:write", "internal"})
    # The hand-made signer (used for odd headers below) makes tokens that verify too.
    by_hand = await static_verifier.verify(
        signed_by_hand(ring_a, rs_header(ring_a), claims(sub=str(subject)))
    )
    assert by_hand.user_id == subject


async def test_expired(static_verifier, ring_a):
    token = issuer_for(ring_a).issue(uuid.uuid4(), email=None, ttl=-120).token
    with pytest.raises(InvalidToken, match="expired"):
        await static_verifier.verify(token)
    now = int(time.time())
    with pytest.raises(InvalidToken):
        await static_verifier.verify(signed(ring_a, rs_header(ring_a), claims(iat=now - 1000, exp=now - 100)))


async def test_not_yet_valid(static_verifier, ring_a):
    now = int(time.time())
    token = signed(ring_a, rs_header(ring_a), claims(nbf=now + 3600))
    with pytest.raises(InvalidToken):
        await static_verifier.verify(token)


@pytest.mark.parametrize(
    "change",
    [
        {"iss": "https://evil.example.com/api/v1/auth"},
        {"iss": ISSUER + "/"},
        {"aud": "someone-else"},
        {"aud": ["someone-else"]},
        {"sub": 42},
        {"iss": None},
        {"aud": None},
        {"sub": None},
        {"exp": None},
        {"iat": None},
        {"exp": "tomorrow"},
    ],
    ids=[
        "wrong-iss",
        "iss-trailing-slash",
        "wrong-aud",
        "wrong-aud-list",
        "bad-sub",
        "no-iss",
        "no-aud",
        "no-sub",
        "no-exp",
        "no-iat",
        "exp-string",
    ],
)
async def test_bad_claims(static_verifier, ring_a, change):
    with pytest.raises(InvalidToken):
        await static_verifier.verify(signed(ring_a, rs_header(ring_a), claims(**change)))


async def test_a_subject_that_is_not_a_user_id_is_refused_as_a_user(static_verifier, ring_a):
    claims_ = await static_verifier.verify(signed(ring_a, rs_header(ring_a), claims(sub="auth-service")))
    assert claims_.subject == "auth-service"
    with pytest.raises(InvalidToken):
        _ = claims_.user_id


async def test_wrong_issuer_and_audience_from_the_real_issuer(static_verifier, ring_a):
    evil = AccessTokenIssuer(ring_a, issuer="https://evil.example.com", audience=AUDIENCE, ttl=900)
    with pytest.raises(InvalidToken):
        await static_verifier.verify(evil.issue(uuid.uuid4(), email=None).token)
    other = issuer_for(ring_a).issue(uuid.uuid4(), email=None, audience="referral-internal").token
    with pytest.raises(InvalidToken):
        await static_verifier.verify(other)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none(static_verifier, ring_a, alg):
    header = {"alg": alg, "typ": "at+jwt", "kid": ring_a.signing_key.kid}
    unsigned = f"{b64json(header)}.{b64json(claims())}."
    with pytest.raises(InvalidToken):
        await static_verifier.verify(unsigned)
    with pytest.raises(InvalidToken):
        await static_verifier.verify(unsigned + b64(b"x"))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_signed_with_the_public_key(static_verifier, ring_a, alg):
    """The classic confusion attack: an HMAC keyed with the published public key."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    public = ring_a.public_keys[0]
    secrets_to_try = [
        public.as_pem(private=False),
        json.dumps(public.as_dict(private=False)).encode(),
    ]
    for secret in secrets_to_try:
        header = {"alg": alg, "typ": "at+jwt", "kid": public.kid}
        signing_input = f"{b64json(header)}.{b64json(claims())}"
        signature = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
        with pytest.raises(InvalidToken):
            await static_verifier.verify(f"{signing_input}.{b64(signature)}")


async def test_hmac_is_refused_even_when_listed(ring_a):
    """Even a verifier misconfigured to list HS256 cannot be fooled with an RSA key's public bytes."""
    lax = TokenVerifier(
        StaticKeySource(ring_a.public_keys), issuer=ISSUER, audience=AUDIENCE, algorithms=("RS256", "HS256")
    )
    public = ring_a.public_keys[0]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": public.kid}
    signing_input = f"{b64json(header)}.{b64json(claims())}"
    signature = hmac.new(public.as_pem(private=False), signing_input.encode("ascii"), hashlib.sha256).digest()
    with pytest.raises(InvalidToken):
        await lax.verify(f"{signing_input}.{b64(signature)}")


@pytest.mark.parametrize("kid", [None, "", 42, ["kid"]], ids=["missing", "empty", "number", "list"])
async def test_missing_or_odd_kid(static_verifier, ring_a, kid):
    header = {"alg": "RS256", "typ": "at+jwt"}
    if kid is not None:
        header["kid"] = kid
    with pytest.raises(InvalidToken):
        await static_verifier.verify(signed_by_hand(ring_a, header, claims()))


async def test_unknown_kid(static_verifier, ring_a, ring_unpublished):
    with pytest.raises(InvalidToken):
        await static_verifier.verify(token_for(ring_unpublished))
    # Signed with another key but claiming the published key's kid.
    forged = signed(ring_unpublished, rs_header(ring_a), claims())
    with pytest.raises(InvalidToken):
        await static_verifier.verify(forged)


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+JWT ", "application/at+jwt", 1])
async def test_typ_must_be_at_jwt(static_verifier, ring_a, typ):
    header = {"alg": "RS256", "kid": ring_a.signing_key.kid}
    if typ is not None:
        header["typ"] = typ
    with pytest.raises(InvalidToken):
        await static_verifier.verify(signed_by_hand(ring_a, header, claims()))


async def test_tampering(static_verifier, ring_a):
    token = token_for(ring_a)
    header, payload, signature = token.split(".")
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    with pytest.raises(InvalidToken):
        await static_verifier.verify(f"{header}.{payload}.{flipped}")
    other = b64json(claims(sub=str(uuid.uuid4())))
    with pytest.raises(InvalidToken):
        await static_verifier.verify(f"{header}.{other}.{signature}")
    with pytest.raises(InvalidToken):
        await static_verifier.verify(f"{header}.{payload}.")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "....",
        "..",
        "a.b.c.d",
        "eyJ.eyJ.sig",
        "!!!.@@@.###",
        "\u00e4.\u00f6.\u00fc",
        "\x00.\x00.\x00",
        b64(b"[1,2]") + ".e30.",
        b64(b'"str"') + ".e30.",
        b64(b"null") + ".e30.",
        b64(b"\xff\xfe") + ".e30.",
        "Bearer x.y.z",
        "A" * 100_000,
        ("A" * 10_000 + ".") * 2 + "A",
    ],
)
async def test_garbage_is_invalid_token(static_verifier, garbage):
    with pytest.raises(InvalidToken):
        await static_verifier.verify(garbage)


async def test_garbage_payload_under_a_valid_header(static_verifier, ring_a):
    header = b64json(rs_header(ring_a))
    for payload in ("", "e30", b64(b"[]"), b64(b"\xff"), "!!!", b64(b'"text"')):
        with pytest.raises(InvalidToken):
            await static_verifier.verify(f"{header}.{payload}.{b64(b'sig')}")


# --- the shared check (shared.jose): algorithms, key types, what a failed fetch says ---------------


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256"])
async def test_an_algorithm_outside_the_list_is_refused(static_verifier, ring_a, alg):
    """Validly signed by the published key under its kid, with an algorithm the verifier does not list."""
    token = jwt.encode(rs_header(ring_a, alg=alg), claims(), ring_a.signing_key, algorithms=[alg])
    with pytest.raises(InvalidToken, match="unsupported algorithm"):
        await static_verifier.verify(token)


async def test_an_ec_key_in_the_jwks_does_not_make_es256_acceptable(jwks_server, session, ring_a):
    """The JWKS publishes an EC key too; a token it signs with ES256 is still refused (RS256 only)."""
    ec = ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True)
    jwks_server.publish(ring_a)
    jwks_server.document["keys"].append(ec.as_dict(private=False))
    check = verifier(RemoteJWKS(jwks_server.url, session))
    es256 = jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": "ec-1"}, claims(), ec, algorithms=["ES256"])
    with pytest.raises(InvalidToken, match="unsupported algorithm"):
        await check.verify(es256)
    lax = TokenVerifier(
        RemoteJWKS(jwks_server.url, session), issuer=ISSUER, audience=AUDIENCE, algorithms=("RS256", "ES256")
    )
    assert (await lax.verify(es256)).subject, "listed, the EC key verifies it: the key was read"
    await check.verify(token_for(ring_a))


async def test_the_only_key_serves_a_lookup_without_kid(jwks_server, session, ring_a, ring_b):
    jwks_server.publish(ring_a)
    keys = RemoteJWKS(jwks_server.url, session, min_refresh_interval=0)
    assert await keys.key_for(None) is await keys.key_for(ring_a.signing_key.kid)
    jwks_server.publish(ring_a, ring_b)
    await keys.refresh()
    assert await keys.key_for(None) is None, "with two keys there is no choice to make without a kid"


@pytest.mark.parametrize(
    ("status", "raw", "delay", "reason"),
    [
        (500, None, 0.0, "HTTP 500"),
        (302, b"{}", 0.0, "HTTP 302"),
        (200, b"<html>not json</html>", 0.0, "not JSON"),
        (200, b'{"keys": "nope"}', 0.0, "not a key set"),
        (200, None, 1.0, "no answer in time"),
    ],
    ids=["500", "redirect-not-followed", "html", "keys-not-list", "slow"],
)
async def test_a_failed_fetch_says_why_and_a_good_one_clears_it(
    jwks_server, session, ring_a, status, raw, delay, reason
):
    jwks_server.publish(ring_a)
    jwks_server.status, jwks_server.raw, jwks_server.delay = status, raw, delay
    keys = RemoteJWKS(jwks_server.url, session, timeout=0.3, min_refresh_interval=0)
    assert await keys.key_for(ring_a.signing_key.kid) is None
    assert keys.fetch_error == reason
    jwks_server.status, jwks_server.raw, jwks_server.delay = 200, None, 0.0
    assert await keys.key_for(ring_a.signing_key.kid) is not None
    assert keys.fetch_error is None


async def test_an_unreachable_jwks_says_so(session):
    keys = RemoteJWKS(f"http://127.0.0.1:{_closed_port()}/jwks.json", session, timeout=1.0)
    assert await keys.key_for("any") is None
    assert keys.fetch_error is not None and keys.fetch_error.startswith("unreachable (")
