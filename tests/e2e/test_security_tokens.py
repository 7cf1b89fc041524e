"""Forged, stale and misused tokens: refused by every authenticated endpoint of both services.

Each case changes one thing in an otherwise genuine token (signed here with the stack's own key,
or with another one) and sends it through the gateway to every endpoint that needs a token, and
to each instance directly for the forgeries that matter most. Every one must be refused with
401 problem+json and `WWW-Authenticate: Bearer error="invalid_token"` (403 `insufficient_scope`
only for a genuine service token without the scope). The control, a token forged here exactly
like the services issue it, is accepted, so each refusal is due to the one thing changed.

`test_tokens_across_instances.py` already covers, on each instance directly: a stranger's key, the
wrong issuer, a service token on `/me` and `/codes/me`, and `not-a-jwt`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from services.auth.adapters.signing import AccessTokenIssuer, parse_key_ring
from tests.e2e import secrets as run_secrets
from tests.e2e.api import (
    AUTH,
    ME,
    MY_CODE,
    REFERRALS,
    RawAnswer,
    create_code,
    exchange_raw,
    jwt_parts,
    referrals_of,
)

USER_AUDIENCE = "referral-system"
SERVICE_AUDIENCE = "referral-service"
SERVICE_SCOPE = "referrals:internal"
INTERNAL_CODE = "/internal/v1/codes/{code}"
INTERNAL_LINK = "/internal/v1/referrals"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def rs_signer(key: rsa.RSAPrivateKey, digest: hashes.HashAlgorithm | None = None) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, padding.PKCS1v15(), digest or hashes.SHA256())


def hs_signer(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS; no signature at all when `sign` is None."""
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode()
    signature = b64url(sign(signing_input)) if sign else ""
    return f"{signing_input.decode()}.{signature}"


@dataclass
class Forgery:
    """What a case needs: the stack's key and kid, a user, and a genuine token of theirs."""

    issuer: str
    key: rsa.RSAPrivateKey
    kid: str
    jwk: dict[str, Any]
    user_id: str
    email: str
    genuine: str
    refresh: str
    other_user_id: str
    now: int = field(default_factory=lambda: int(time.time()))

    def header(self, **changes: Any) -> dict[str, Any]:
        header = {"alg": "RS256", "kid": self.kid, "typ": "at+jwt"}
        header.update(changes)
        return {k: v for k, v in header.items() if v is not _DROP}

    def claims(self, **changes: Any) -> dict[str, Any]:
        claims = {
            "iss": self.issuer,
            "aud": USER_AUDIENCE,
            "sub": self.user_id,
            "email": self.email,
            "iat": self.now,
            "exp": self.now + 600,
            "jti": uuid.uuid4().hex,
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not _DROP}

    def signed(self, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None) -> str:
        return forge(header or self.header(), claims or self.claims(), rs_signer(self.key))


_DROP = object()  # a claim or header field to leave out
_STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _stranger_jwk() -> dict[str, Any]:
    ring = parse_key_ring(
        _STRANGER.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    )
    return dict(ring.public_keys[0].as_dict(private=False)) | {"kid": ring.public_keys[0].kid}


def _public_pem(f: Forgery, fmt: serialization.PublicFormat) -> bytes:
    return f.key.public_key().public_bytes(serialization.Encoding.PEM, fmt)


def _tampered(f: Forgery) -> str:
    """The genuine token's header and signature around claims naming another user."""
    header, _, signature = f.genuine.split(".")
    _, claims = jwt_parts(f.genuine)
    claims["sub"] = f.other_user_id
    return f"{header}.{b64url(_json(claims))}.{signature}"


def _service(f: Forgery, scope: list[str], audience: str = SERVICE_AUDIENCE) -> str:
    ring = parse_key_ring(
        f.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    )
    issuer = AccessTokenIssuer(ring, issuer=f.issuer, audience=USER_AUDIENCE, ttl=300)
    return issuer.issue("auth-service", email=None, audience=audience, scope=scope).token


# Each case: a token built from the genuine one with one thing wrong. All must answer 401.
CASES: dict[str, Callable[[Forgery], str]] = {
    # time
    "expired": lambda f: f.signed(claims=f.claims(iat=f.now - 3600, exp=f.now - 120)),
    "not yet valid (nbf in an hour)": lambda f: f.signed(claims=f.claims(nbf=f.now + 3600)),
    "issued in the future (iat in an hour)": lambda f: f.signed(claims=f.claims(iat=f.now + 3600)),
    "exp not a number": lambda f: f.signed(claims=f.claims(exp="never")),
    "no exp": lambda f: f.signed(claims=f.claims(exp=_DROP)),
    "no iat": lambda f: f.signed(claims=f.claims(iat=_DROP)),
    # who it is for, who made it, who it is about
    "wrong iss": lambda f: f.signed(claims=f.claims(iss="http://evil.test/api/v1/auth")),
    "iss with a trailing slash": lambda f: f.signed(claims=f.claims(iss=f.issuer + "/")),
    "no iss": lambda f: f.signed(claims=f.claims(iss=_DROP)),
    "wrong aud": lambda f: f.signed(claims=f.claims(aud="someone-else")),
    "aud list without ours": lambda f: f.signed(claims=f.claims(aud=["someone-else", "another"])),
    "no aud": lambda f: f.signed(claims=f.claims(aud=_DROP)),
    "no sub": lambda f: f.signed(claims=f.claims(sub=_DROP)),
    "sub not a user id": lambda f: f.signed(claims=f.claims(sub="auth-service")),
    "sub not a string": lambda f: f.signed(claims=f.claims(sub=12345)),
    "claims tampered after signing": _tampered,
    # keys
    "unknown kid (right key)": lambda f: f.signed(header=f.header(kid="no-such-key-" + uuid.uuid4().hex)),
    "no kid": lambda f: f.signed(header=f.header(kid=_DROP)),
    "kid not a string": lambda f: f.signed(header=f.header(kid=["a", "b"])),
    "another key with the right kid": lambda f: forge(f.header(), f.claims(), rs_signer(_STRANGER)),
    "another key, its own jwk embedded in the header": lambda f: forge(
        f.header(jwk=_stranger_jwk()), f.claims(), rs_signer(_STRANGER)
    ),
    "another key, its jku in the header": lambda f: forge(
        f.header(kid=_stranger_jwk()["kid"], jku="http://127.0.0.1:9/jwks.json"),
        f.claims(),
        rs_signer(_STRANGER),
    ),
    # algorithms
    "alg none, no signature": lambda f: forge(f.header(alg="none"), f.claims(), None),
    "alg None, no signature": lambda f: forge(f.header(alg="None"), f.claims(), None),
    "alg NONE, genuine signature kept": lambda f: _reheader(f, f.header(alg="NONE")),
    "alg none, genuine signature kept": lambda f: _reheader(f, f.header(alg="none")),
    "no alg": lambda f: forge(f.header(alg=_DROP), f.claims(), rs_signer(f.key)),
    "HS256 keyed with the public key (SPKI PEM)": lambda f: forge(
        f.header(alg="HS256"),
        f.claims(),
        hs_signer(_public_pem(f, serialization.PublicFormat.SubjectPublicKeyInfo)),
    ),
    "HS256 keyed with the public key (PKCS#1 PEM)": lambda f: forge(
        f.header(alg="HS256"), f.claims(), hs_signer(_public_pem(f, serialization.PublicFormat.PKCS1))
    ),
    "HS256 keyed with the public key (JWK JSON)": lambda f: forge(
        f.header(alg="HS256"), f.claims(), hs_signer(json.dumps(f.jwk).encode())
    ),
    "HS256 keyed with the public key (compact JWK JSON)": lambda f: forge(
        f.header(alg="HS256"), f.claims(), hs_signer(_json(f.jwk))
    ),
    "HS256 keyed with the public key (JWK n)": lambda f: forge(
        f.header(alg="HS256"), f.claims(), hs_signer(f.jwk["n"].encode())
    ),
    "RS512 with the right key (algorithm not pinned)": lambda f: forge(
        f.header(alg="RS512"), f.claims(), rs_signer(f.key, hashes.SHA512())
    ),
    # token types
    "typ JWT": lambda f: f.signed(header=f.header(typ="JWT")),
    "no typ": lambda f: f.signed(header=f.header(typ=_DROP)),
    "typ rt+jwt": lambda f: f.signed(header=f.header(typ="rt+jwt")),
    "a refresh token as the access token": lambda f: f.refresh,
    "a service token (aud referral-service, scope referrals:internal)": lambda f: _service(
        f, [SERVICE_SCOPE]
    ),
    # malformed
    "two segments": lambda f: ".".join(f.genuine.split(".")[:2]),
    "four segments": lambda f: f.genuine + ".AAAA",
    "genuine token with a character appended": lambda f: f.genuine + "x",
    "empty segments": lambda f: "..",
    "header not base64": lambda f: "%%%." + ".".join(f.genuine.split(".")[1:]),
    "header a JSON array": lambda f: b64url(b"[1,2]") + "." + ".".join(f.genuine.split(".")[1:]),
    "header a JSON string": lambda f: b64url(b'"x"') + "." + ".".join(f.genuine.split(".")[1:]),
    "header not UTF-8": lambda f: b64url(b"\xff\xfe\xfd") + "." + ".".join(f.genuine.split(".")[1:]),
    "header with a 5000-digit number": lambda f: b64url(b'{"alg":' + b"9" * 5000 + b"}") + ".e30.c2ln",
    "header nested 2000 deep (array)": lambda f: b64url(b"[" * 2000 + b"]" * 2000) + ".e30.c2ln",
    "header nested 1100 deep (object)": lambda f: b64url(b'{"":' * 1100 + b"1" + b"}" * 1100) + ".e30.c2ln",
    "payload nested 2000 deep": lambda f: (
        f"{b64url(_json(f.header()))}.{b64url(b'[' * 2000 + b']' * 2000)}.c2ln"
    ),
    "payload a JSON array, validly signed": lambda f: _signed_raw(f, b"[1,2,3]"),
    "payload not JSON, validly signed": lambda f: _signed_raw(f, b"not json"),
}

# The cases also sent to every instance directly (the gateway adds nothing, but it could hide a
# difference between the auth service's verifier and the referral service's JWKS-backed one).
DIRECT_CASES = (
    "expired",
    "not yet valid (nbf in an hour)",
    "wrong aud",
    "unknown kid (right key)",
    "another key with the right kid",
    "alg none, no signature",
    "HS256 keyed with the public key (SPKI PEM)",
    "HS256 keyed with the public key (JWK JSON)",
    "typ JWT",
    "a refresh token as the access token",
    "header nested 2000 deep (array)",
)


def _reheader(f: Forgery, header: dict[str, Any]) -> str:
    """The genuine token's claims and signature under another header."""
    _, claims, signature = f.genuine.split(".")
    return f"{b64url(_json(header))}.{claims}.{signature}"


def _signed_raw(f: Forgery, payload: bytes) -> str:
    signing_input = f"{b64url(_json(f.header()))}.{b64url(payload)}".encode()
    return f"{signing_input.decode()}.{b64url(rs_signer(f.key)(signing_input))}"


Answer = RawAnswer


async def send(
    base_url: str, method: str, path: str, authorization: bytes | None, body: Any = None
) -> Answer:
    """One request with the Authorization header exactly as given (bytes, no client-side checks)."""
    payload = _json(body) if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nContent-Length: {len(payload)}\r\n".encode()
    if body is not None:
        head += b"Content-Type: application/json\r\n"
    if authorization is not None:
        head += b"Authorization: " + authorization + b"\r\n"
    return await exchange_raw(base_url, head, payload, timeout=15)


def refusal_problems(answer: Answer, status: int = 401, error: str = "invalid_token") -> list[str]:
    """What is wrong with `answer` as a refusal (empty when it is right)."""
    problems: list[str] = []
    if answer.status != status:
        problems.append(f"status {answer.status}, expected {status}: {answer.body[:200]!r}")
        return problems
    if answer.headers.get("content-type", "").split(";")[0] != "application/problem+json":
        problems.append(f"content-type {answer.headers.get('content-type')!r}")
    try:
        body = json.loads(answer.body)
        if body.get("status") != status or body.get("code") != error:
            problems.append(f"body {body}")
    except ValueError:
        problems.append(f"body not JSON: {answer.body[:200]!r}")
    challenge = answer.headers.get("www-authenticate", "")
    if not challenge.startswith("Bearer") or f'error="{error}"' not in challenge:
        problems.append(f"WWW-Authenticate {challenge!r}")
    return problems


def user_endpoints(f: Forgery) -> list[tuple[str, str, Any]]:
    """Every authenticated user endpoint of both services: method, path, JSON body."""
    return [
        ("GET", ME, None),
        ("GET", MY_CODE, None),
        ("DELETE", MY_CODE, None),
        ("POST", f"{REFERRALS.rsplit('/', 1)[0]}/codes", {"expires_at": "2099-01-01T00:00:00+00:00"}),
        ("POST", REFERRALS, {"code": "NOSUCHCODE42"}),
        ("GET", referrals_of(f.user_id), None),
    ]


@pytest.fixture
async def forgery(stack, gateway, make_account) -> Forgery:
    account = await make_account("forgery")
    other = await make_account("forgery-other")
    await create_code(gateway, account)  # so the control's /codes/me is a 200
    key = serialization.load_pem_private_key(stack.signing_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    response = await gateway.get(f"{AUTH}/.well-known/jwks.json")
    assert response.status == 200, await response.text()
    kid = jwt_parts(account.access_token)[0]["kid"]
    (jwk,) = [k for k in (await response.json())["keys"] if k["kid"] == kid]
    return Forgery(
        issuer=stack.issuer,
        key=key,
        kid=kid,
        jwk=jwk,
        user_id=account.id,
        email=account.email,
        genuine=account.access_token,
        refresh=account.refresh_token,
        other_user_id=other.id,
    )


async def test_the_control_forged_like_the_services_is_accepted_everywhere(stack, forgery):
    """The forging code is right: an untouched forgery works on every endpoint and instance."""
    token = f"Bearer {forgery.signed()}".encode()
    referral_paths = [
        ("GET", MY_CODE, None, 200),
        ("POST", REFERRALS, {"code": "NOSUCHCODE42"}, 404),
        ("GET", referrals_of(forgery.user_id), None, 200),
    ]
    targets = [(stack.gateway_url, [("GET", ME, None, 200), *referral_paths])]
    targets += [(url, [("GET", ME, None, 200)]) for url in stack.auth_urls]
    targets += [(url, referral_paths) for url in stack.referral_urls]
    for base, requests in targets:
        for method, path, body, status in requests:
            answer = await send(base, method, path, token, body)
            assert answer.status == status, (base, method, path, answer.status, answer.body[:300])
    # The genuine token too, and the scheme is case-insensitive (RFC 7235).
    for scheme in ("Bearer", "bearer", "BEARER"):
        answer = await send(stack.gateway_url, "GET", ME, f"{scheme} {forgery.genuine}".encode())
        assert answer.status == 200, (scheme, answer.status, answer.body[:300])


@pytest.mark.parametrize("case", list(CASES))
async def test_a_forged_token_is_refused_by_every_endpoint_through_the_gateway(stack, forgery, case):
    token = CASES[case](forgery)
    failures = []
    for method, path, body in user_endpoints(forgery):
        answer = await send(stack.gateway_url, method, path, f"Bearer {token}".encode(), body)
        failures += [f"{method} {path}: {problem}" for problem in refusal_problems(answer)]
    # Refused means refused: the user's code survived the DELETE above.
    still = await send(stack.gateway_url, "GET", MY_CODE, f"Bearer {forgery.genuine}".encode())
    if still.status != 200:
        failures.append(f"after the forged DELETE, /codes/me answers {still.status}: the DELETE went through")
    assert not failures, f"{case}:\n" + "\n".join(failures)


@pytest.mark.parametrize("case", DIRECT_CASES)
async def test_a_forged_token_is_refused_by_each_instance_directly(stack, forgery, case):
    token = CASES[case](forgery)
    failures = []
    targets = [(url, ME) for url in stack.auth_urls] + [(url, MY_CODE) for url in stack.referral_urls]
    for url, path in targets:
        answer = await send(url, "GET", path, f"Bearer {token}".encode())
        failures += [f"{url}{path}: {problem}" for problem in refusal_problems(answer)]
    assert not failures, f"{case}:\n" + "\n".join(failures)


async def test_user_tokens_are_refused_on_internal_and_the_gateway_hides_it(stack, forgery):
    link = {
        "referral_id": forgery.other_user_id,
        "referrer_id": forgery.user_id,
        "referral_email": "someone@example.com",
        "code": "NOSUCHCODE42",
    }
    failures = []
    user_token = f"Bearer {forgery.genuine}".encode()
    for url in stack.referral_urls:
        for method, path, body in (
            ("GET", INTERNAL_CODE.format(code="NOSUCHCODE42"), None),
            ("POST", INTERNAL_LINK, link),
        ):
            answer = await send(url, method, path, user_token, body)
            failures += [f"{url} {method} {path}: {p}" for p in refusal_problems(answer)]
            answer = await send(url, method, path, None, body)
            failures += [f"{url} {method} {path} (no token): {p}" for p in refusal_problems(answer)]
    # Through the gateway, /internal/ does not exist, whatever the token.
    service_token = f"Bearer {_service(forgery, [SERVICE_SCOPE])}".encode()
    for token in (user_token, service_token):
        answer = await send(stack.gateway_url, "GET", INTERNAL_CODE.format(code="NOSUCHCODE42"), token)
        if answer.status != 404:
            failures.append(f"gateway /internal/: {answer.status} {answer.body[:200]!r}")
    assert not failures, "\n".join(failures)


async def test_service_tokens_need_the_internal_audience_and_scope(stack, forgery):
    """A genuine service token works on /internal/ (the control); without the scope 403; elsewhere 401."""
    failures = []
    code_path = INTERNAL_CODE.format(code="NOSUCHCODE42")
    service = _service(forgery, [SERVICE_SCOPE])
    for url in stack.referral_urls:
        answer = await send(url, "GET", code_path, f"Bearer {service}".encode())
        if answer.status != 404:  # accepted: the code is unknown
            failures.append(f"control {url}: {answer.status} {answer.body[:200]!r}")
        for label, token, status, error in (
            ("no scope", _service(forgery, []), 403, "insufficient_scope"),
            ("another scope", _service(forgery, ["referrals:read"]), 403, "insufficient_scope"),
            ("scope as a prefix", _service(forgery, ["referrals:internalx"]), 403, "insufficient_scope"),
            (
                "user audience with the scope",
                _service(forgery, [SERVICE_SCOPE], USER_AUDIENCE),
                401,
                "invalid_token",
            ),
            (
                "expired",
                forge(
                    forgery.header(),
                    {
                        "iss": forgery.issuer,
                        "aud": SERVICE_AUDIENCE,
                        "sub": "auth-service",
                        "scope": SERVICE_SCOPE,
                        "iat": forgery.now - 3600,
                        "exp": forgery.now - 120,
                    },
                    rs_signer(forgery.key),
                ),
                401,
                "invalid_token",
            ),
            (
                "another key, right kid",
                forge(
                    forgery.header(),
                    {
                        "iss": forgery.issuer,
                        "aud": SERVICE_AUDIENCE,
                        "sub": "auth-service",
                        "scope": SERVICE_SCOPE,
                        "iat": forgery.now,
                        "exp": forgery.now + 300,
                    },
                    rs_signer(_STRANGER),
                ),
                401,
                "invalid_token",
            ),
        ):
            answer = await send(url, "GET", code_path, f"Bearer {token}".encode())
            failures += [f"{url} {label}: {p}" for p in refusal_problems(answer, status, error)]
    # The service token on every user endpoint of both services, through the gateway: 401.
    for method, path, body in user_endpoints(forgery):
        answer = await send(stack.gateway_url, method, path, f"Bearer {service}".encode(), body)
        failures += [f"gateway {method} {path}: {p}" for p in refusal_problems(answer)]
    assert not failures, "\n".join(failures)


GARBAGE_HEADERS: dict[str, bytes] = {
    "absent": b"",
    "empty": b"",
    "scheme only": b"Bearer",
    "scheme and spaces": b"Bearer    ",
    "Basic credentials": b"Basic dXNlcjpwYXNzd29yZA==",
    "Digest": b'Digest username="u", realm="r"',
    "token without scheme": b"eyJhbGciOiJub25lIn0.e30.",
    "two tokens": b"Bearer a.b.c Bearer d.e.f",
    "a comma list": b"Bearer a.b.c, Bearer d.e.f",
    "dots only": b"Bearer ...",
    "not base64": b"Bearer !!!.@@@.###",
    "4 KB of A": b"Bearer " + b"A" * 4096,
    "6 KB token-like": b"Bearer " + b"eyJ" + b"A" * 3000 + b"." + b"B" * 3000 + b".C",
    "UTF-8 unicode": "Bearer ключ.токен.подпись".encode(),
    "RTL override and zero-width": "Bearer \u202eabc\u200d.def\u200b.ghi".encode(),
    "emoji": "Bearer 🔑.🔑.🔑".encode(),
    "latin-1 bytes": b"Bearer \xe9\xe8\xff.\xfe.\xfd",
    "invalid UTF-8": b"Bearer \xc3\x28.\xa0\xa1.\xed\xa0\x80",
    "NUL byte": b"Bearer abc\x00def.ghi.jkl",
    "tab inside": b"Bearer abc\tdef.ghi.jkl",
    "DEL": b"Bearer abc\x7f.def.ghi",
    "percent-encoded": b"Bearer %65%79%4a.%41.%42",
}
# The gateway may refuse these itself (bad header bytes, too large): 400/431 problem+json, never 5xx.
GATEWAY_MAY_REFUSE = {"NUL byte", "DEL", "invalid UTF-8", "latin-1 bytes"}


@pytest.mark.parametrize("case", list(GARBAGE_HEADERS))
async def test_garbage_authorization_headers_are_refused(stack, case):
    value = GARBAGE_HEADERS[case]
    authorization = None if case == "absent" else value
    failures = []
    for base, path in [
        (stack.gateway_url, ME),
        (stack.gateway_url, MY_CODE),
        *((url, ME) for url in stack.auth_urls),
        *((url, MY_CODE) for url in stack.referral_urls),
    ]:
        answer = await send(base, "GET", path, authorization)
        if answer.status >= 500:
            failures.append(f"{base}{path}: {answer.status} {answer.body[:200]!r}")
        elif base == stack.gateway_url and case in GATEWAY_MAY_REFUSE and answer.status in (400, 431):
            continue
        elif base != stack.gateway_url and case in GATEWAY_MAY_REFUSE and answer.status == 400:
            continue  # aiohttp's parser refuses the header line before the service sees it
        else:
            failures += [f"{base}{path}: {p}" for p in refusal_problems(answer)]
    assert not failures, f"{case}:\n" + "\n".join(failures)


async def test_an_authorization_header_over_the_gateway_limit_is_431_not_5xx(stack):
    answer = await send(stack.gateway_url, "GET", ME, b"Bearer " + b"A" * 64 * 1024)
    assert answer.status in (400, 431), (answer.status, answer.body[:300])
    assert answer.headers.get("content-type", "").startswith("application/problem+json"), answer.headers


async def test_tokens_seen_here_are_registered_for_the_log_scan(forgery):
    """The forged tokens are not secrets, but the genuine ones are: the registry has them."""
    assert forgery.genuine in run_secrets.recorded()
    assert forgery.refresh in run_secrets.recorded()
