"""Access-token verification against a JWKS: the piece every authenticated request runs.

`TokenVerifier` checks an RFC 9068 access token: the algorithm is pinned (RS256 by default, never
`none` nor an HMAC), the key is chosen by `kid` from a key source, the header's `typ` must be
`at+jwt`, and `iss`, `aud`, `exp`, `iat`, `nbf`, `sub` are checked. The auth service verifies with
its own key set (`StaticKeySource`); the referral service with `RemoteJWKS`, which fetches the
auth service's JWKS, caches it, and refetches (at most once per `min_refresh_interval`) when a
token names a `kid` it does not know, so a key rotation needs no restart.

A client sends the same token with every request for its whole lifetime, and a full check (RSA
signature included) costs about 65 µs of CPU. So a token that passed is remembered (exactly that
token, for one verifier): later requests with it are checked only for what can change since, its
expiry and whether its key is still the one published under its `kid` (a key withdrawn from the
JWKS, or replaced, refuses its tokens at once).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from shared.problems import InsufficientScope, InvalidToken, MissingToken

log = logging.getLogger(__name__)

ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 (a media type, not a secret)
DEFAULT_ALGORITHMS = ("RS256",)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified token says about its bearer."""

    subject: str
    email: str | None
    scope: frozenset[str]
    expires_at: int
    token_id: str | None
    raw: Mapping[str, Any]

    @property
    def user_id(self) -> uuid.UUID:
        """The subject as a user id; user tokens always have one, service tokens do not."""
        try:
            return uuid.UUID(self.subject)
        except ValueError:
            raise InvalidToken("the token's subject is not a user") from None

    @property
    def email_verified(self) -> bool:
        """Whether the user's address was proven when the token was issued."""
        return self.raw.get("email_verified") is True

    @property
    def session_id(self) -> uuid.UUID | None:
        """The login the token belongs to (`sid`: its refresh-token family), when it says."""
        try:
            return uuid.UUID(str(self.raw["sid"]))
        except (KeyError, ValueError):
            return None


class KeySource(Protocol):
    """Where verification keys come from."""

    async def key_for(self, kid: str) -> RSAKey | None:
        """The public key with this `kid`, or None when no such key is published."""


class StaticKeySource:
    """A fixed set of public keys (the auth service verifies with the keys it publishes)."""

    def __init__(self, keys: Sequence[RSAKey]) -> None:
        self._keys = {key.kid: key for key in keys if key.kid}

    async def key_for(self, kid: str) -> RSAKey | None:
        return self._keys.get(kid)


class RemoteJWKS:
    """A JWKS fetched over HTTP, cached, refreshed on an unknown `kid` and every `max_age` seconds."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 3.0,
        max_age: float = 300.0,
        min_refresh_interval: float = 10.0,
    ) -> None:
        self._url = url
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_age = max_age
        self._min_refresh_interval = min_refresh_interval
        self._keys: dict[str, RSAKey] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str) -> RSAKey | None:
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None and now - self._fetched_at < self._max_age:
            return key
        if now - self._fetched_at >= self._min_refresh_interval:
            await self.refresh()
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the JWKS once even when many requests ask at the same moment."""
        started = time.monotonic()
        async with self._lock:
            if self._fetched_at >= started:
                return  # another request refreshed while this one waited
            try:
                async with self._session.get(self._url, timeout=self._timeout) as response:
                    response.raise_for_status()
                    document = await response.json(content_type=None)
                self._keys = parse_jwks(document)
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                # Keep serving with the keys already known; try again after the interval.
                log.warning("JWKS fetch from %s failed: %s", self._url, type(error).__name__)
            self._fetched_at = time.monotonic()


def parse_jwks(document: Any) -> dict[str, RSAKey]:
    """RSA public keys by kid from a JWKS document; keys of other types or without kid are skipped."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, RSAKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or entry.get("kty") != "RSA" or not entry.get("kid"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = RSAKey.import_key(dict(entry))
        except (JoseError, ValueError, TypeError):
            continue
        keys[str(entry["kid"])] = key
    return keys


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


MAX_TOKEN_LENGTH = 8192
MAX_HEADER_LENGTH = 1024


def _header(token: str) -> Mapping[str, Any]:
    parts = token.split(".")
    # Our headers are about 120 characters: anything long is not ours, and is not parsed (no deep
    # nesting reaches the JSON parser).
    if len(parts) != 3 or len(token) > MAX_TOKEN_LENGTH or len(parts[0]) > MAX_HEADER_LENGTH:
        raise InvalidToken("malformed token")
    try:
        header = _b64json(parts[0])
    except (ValueError, RecursionError, binascii.Error, UnicodeEncodeError):
        raise InvalidToken("malformed token") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed token")
    return header


VERIFIED_CACHE_SIZE = 10_000


class TokenVerifier:
    """Verify access tokens for one audience; pinned algorithms, required claims, clock leeway.

    Tokens that passed are remembered (up to `cache_size`, oldest dropped first; 0 disables it).
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        algorithms: Collection[str] = DEFAULT_ALGORITHMS,
        leeway: int = 30,
        required_scope: str | None = None,
        cache_size: int = VERIFIED_CACHE_SIZE,
    ) -> None:
        self._keys = keys
        self._verified: dict[str, tuple[AccessClaims, str, RSAKey]] = {}
        self._cache_size = cache_size
        self._issuer = issuer
        self._audience = audience
        self._algorithms = list(algorithms)
        self._leeway = leeway
        self._required_scope = required_scope

    async def verify(self, token: str) -> AccessClaims:
        """The token's claims, or InvalidToken saying (briefly, without secrets) what was wrong."""
        known = self._verified.get(token)
        if known is not None:
            claims, kid, key = known
            # Only time and the key set change a verdict: a withdrawn or replaced key, or expiry.
            if claims.expires_at + self._leeway > time.time() and await self._keys.key_for(kid) is key:
                return claims
            # Another request with this token may have dropped it while the key was looked up.
            self._verified.pop(token, None)
        claims, kid, key = await self._verify(token)
        if self._cache_size > 0:
            if len(self._verified) >= self._cache_size:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (claims, kid, key)
        return claims

    async def _verify(self, token: str) -> tuple[AccessClaims, str, RSAKey]:
        header = _header(token)
        if header.get("alg") not in self._algorithms:
            raise InvalidToken("unsupported algorithm")
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise InvalidToken("not an access token")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("token has no key id")
        key = await self._keys.key_for(kid)
        if key is None:
            raise InvalidToken("unknown signing key")
        try:
            decoded = jwt.decode(token, key, algorithms=self._algorithms)
        except (JoseError, ValueError, TypeError):
            raise InvalidToken("bad signature") from None
        claims = decoded.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=self._leeway,
            iss={"essential": True, "value": self._issuer},
            aud={"essential": True, "value": self._audience},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as error:
            raise InvalidToken(_claim_problem(error)) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("bad subject")
        scope = claims.get("scope")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        if self._required_scope is not None and self._required_scope not in scopes:
            raise InsufficientScope(f"requires scope {self._required_scope}")
        email = claims.get("email")
        verified = AccessClaims(
            subject=subject,
            email=email if isinstance(email, str) else None,
            scope=scopes,
            expires_at=int(claims["exp"]),
            token_id=str(claims["jti"]) if "jti" in claims else None,
            raw=claims,
        )
        return verified, kid, key


def _claim_problem(error: JoseError) -> str:
    name = type(error).__name__
    if name == "ExpiredTokenError":
        return "token expired"
    if name == "InvalidTokenError":
        return "token not yet valid"
    claim = getattr(error, "claim", None)
    return f"invalid claim {claim}" if claim else "invalid claims"


def bearer_token(request: web.Request) -> str:
    """The token from `Authorization: Bearer ...`, or MissingToken."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingToken()
    return token.strip()


CLAIMS = web.RequestKey("claims", AccessClaims)
