"""GET /api/v1/auth/me, the JWKS and discovery documents, and refusal of every kind of bad token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import pytest
from joserfc import jwt

from services.auth.adapters.signing import AccessTokenIssuer, generate_pem, parse_key_ring
from tests.helpers import signup

ME = "/api/v1/auth/me"
ISSUER = "http://127.0.0.1:8080/api/v1/auth"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, claims: dict) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def claims_for(user_id: str, **changes) -> dict:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "referral-system",
        "sub": user_id,
        "iat": now,
        "exp": now + 600,
        "jti": "j",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def get_me(client, token):
    return await client.get(ME, headers={"Authorization": f"Bearer {token}"})


async def test_me_returns_the_profile(auth_client):
    body = await signup(auth_client, "Olga@Example.com")
    response = await get_me(auth_client, body["access_token"])
    assert response.status == 200
    me = await response.json()
    assert me == {
        "id": body["user"]["id"],
        "email": "Olga@Example.com",
        "email_verified": False,
        "created_at": body["user"]["created_at"],
        "referrer_id": None,
        "email_check": None,
        "profile": None,
    }


async def test_access_token_shape(auth_client, signing_pem):
    body = await signup(auth_client, "pam@example.com")
    ring = parse_key_ring(signing_pem)
    token = jwt.decode(body["access_token"], ring.signing_key, algorithms=["RS256"])
    assert token.header["typ"] == "at+jwt"
    assert token.header["kid"] == ring.signing_key.kid
    assert token.header["alg"] == "RS256"
    assert set(token.claims) == {"iss", "aud", "sub", "email", "email_verified", "sid", "iat", "exp", "jti"}
    assert token.claims["iss"] == ISSUER
    assert token.claims["sub"] == body["user"]["id"]
    assert token.claims["email_verified"] is False
    assert uuid.UUID(token.claims["sid"])  # the login (refresh-token family) it belongs to
    assert token.claims["exp"] - token.claims["iat"] == 900


async def test_me_without_token_is_401_with_challenge(auth_client):
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        response = await auth_client.get(ME, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == "invalid_token"


def _bad_tokens(signing_pem: str, user_id: str) -> dict[str, str]:
    ring = parse_key_ring(signing_pem)
    key = ring.signing_key
    header = {"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}

    def sign(claims, hdr=header, signing_key=key):
        return jwt.encode(hdr, claims, signing_key, algorithms=["RS256"])

    good = sign(claims_for(user_id))
    head, payload, signature = good.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered_claims["sub"] = str(uuid.uuid4())
    public_pem = key.as_pem(private=False)
    hs_header = b64(json.dumps({"alg": "HS256", "kid": key.kid, "typ": "at+jwt"}).encode())
    hs_payload = b64(json.dumps(claims_for(user_id)).encode())
    hs_sig = b64(hmac.new(public_pem, f"{hs_header}.{hs_payload}".encode(), hashlib.sha256).digest())
    other = parse_key_ring(generate_pem()).signing_key
    return {
        "expired": sign(claims_for(user_id, iat=int(time.time()) - 4000, exp=int(time.time()) - 3000)),
        "not yet valid": sign(claims_for(user_id, nbf=int(time.time()) + 3000)),
        "tampered": f"{head}.{b64(json.dumps(tampered_claims).encode())}.{signature}",
        "wrong aud": sign(claims_for(user_id, aud="someone-else")),
        "wrong iss": sign(claims_for(user_id, iss="http://evil.example/api/v1/auth")),
        "no exp": sign(claims_for(user_id, exp=None)),
        "alg none": unsigned({"alg": "none", "kid": key.kid, "typ": "at+jwt"}, claims_for(user_id)),
        "hs256 with the public key": f"{hs_header}.{hs_payload}.{hs_sig}",
        "unknown kid": sign(claims_for(user_id), {**header, "kid": other.kid}, other),
        "right kid, other key": sign(claims_for(user_id), header, other),
        "typ JWT": sign(claims_for(user_id), {**header, "typ": "JWT"}),
        "no kid": sign(claims_for(user_id), {"alg": "RS256", "typ": "at+jwt"}),
        "garbage": "not-a-jwt",
        "bad base64": "@@@.###.$$$",
        "header not an object": f"{b64(b'[1]')}.{b64(b'{}')}.x",
    }


BAD_TOKEN_NAMES = [
    "expired", "not yet valid", "tampered", "wrong aud", "wrong iss", "no exp", "alg none",
    "hs256 with the public key", "unknown kid", "right kid, other key", "typ JWT", "no kid",
    "garbage", "bad base64", "header not an object",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
async def test_bad_access_tokens_are_refused(auth_client, signing_pem, name):
    body = await signup(auth_client, "quinn@example.com")
    token = _bad_tokens(signing_pem, body["user"]["id"])[name]
    response = await get_me(auth_client, token)
    assert response.status == 401, name
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_refresh_token_is_not_an_access_token(auth_client):
    body = await signup(auth_client, "rita@example.com")
    assert (await get_me(auth_client, body["refresh_token"])).status == 401


async def test_token_of_a_deleted_user_is_refused(auth_client, db):
    body = await signup(auth_client, "sam@example.com")
    with db.cursor() as cursor:
        cursor.execute("DELETE FROM auth.users WHERE id = %s", (body["user"]["id"],))
    assert (await get_me(auth_client, body["access_token"])).status == 401


async def test_jwks_publishes_the_signing_key(auth_client, signing_pem):
    response = await auth_client.get("/api/v1/auth/.well-known/jwks.json")
    assert response.status == 200
    keys = (await response.json())["keys"]
    ring = parse_key_ring(signing_pem)
    assert [k["kid"] for k in keys] == [ring.signing_key.kid]
    assert keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256" and keys[0]["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(keys[0])


async def test_key_rotation_keeps_old_tokens_valid(make_auth_client, signing_pem):
    old_client = await make_auth_client()
    body = await signup(old_client, "tess@example.com")
    new_pem = generate_pem()
    rotated = await make_auth_client(jwt_private_keys=new_pem + "\n" + signing_pem)
    keys = (await (await rotated.get("/api/v1/auth/.well-known/jwks.json")).json())["keys"]
    assert [k["kid"] for k in keys] == [
        parse_key_ring(new_pem).signing_key.kid,
        parse_key_ring(signing_pem).signing_key.kid,
    ]
    assert (await get_me(rotated, body["access_token"])).status == 200
    fresh = await (
        await rotated.post(
            "/api/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
        )
    ).json()
    header = jwt.decode(
        fresh["access_token"], parse_key_ring(new_pem).signing_key, algorithms=["RS256"]
    ).header
    assert header["kid"] == parse_key_ring(new_pem).signing_key.kid
    # Once the old key is dropped, its tokens stop working.
    dropped = await make_auth_client(jwt_private_keys=new_pem)
    assert (await get_me(dropped, body["access_token"])).status == 401


async def test_issuer_and_verifier_agree_across_replicas(make_auth_client):
    """Two replicas with the same configured keys accept each other's tokens."""
    one, two = await make_auth_client(), await make_auth_client()
    body = await signup(one, "uma@example.com")
    assert (await get_me(two, body["access_token"])).status == 200


async def test_discovery_document(auth_client):
    response = await auth_client.get("/api/v1/auth/.well-known/openid-configuration")
    assert response.status == 200
    doc = await response.json()
    assert doc["issuer"] == ISSUER
    assert doc["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert doc["token_endpoint"] == f"{ISSUER}/token"
    assert doc["revocation_endpoint"] == f"{ISSUER}/revoke"
    assert set(doc["grant_types_supported"]) == {"password", "refresh_token"}


def test_issuer_signs_with_the_first_key():
    pem_a, pem_b = generate_pem(), generate_pem()
    ring = parse_key_ring(pem_a + pem_b)
    issued = AccessTokenIssuer(ring, issuer=ISSUER, audience="referral-system", ttl=60).issue(
        uuid.uuid4(), email=None
    )
    assert (
        jwt.decode(issued.token, parse_key_ring(pem_a).signing_key, algorithms=["RS256"]).header["kid"]
        == ring.signing_key.kid
    )
