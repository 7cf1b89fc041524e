"""Access-token verification against a JWKS: the piece every authenticated request runs.

`TokenVerifier` checks an RFC 9068 access token: the algorithm is pinned (RS256 by default, never
`none` nor an HMAC), the key is chosen by `kid` from a key source, the header's `typ` must be
`at+jwt`, and `iss`, `aud`, `exp`, `iat`, `nbf`, `sub` are checked. The header, key and signature
steps are `shared.jose.verify_signed`, the one JWT check (the sign-in's ID tokens use it too). The
auth service verifies with its own key set (`StaticKeySource`); the referral service with
`RemoteJWKS`, which fetches the auth service's JWKS, caches it, and refetches (at most once per
`min_refresh_interval`) when a token names a `kid` it does not know, so a key rotation needs no
restart. Both key sources live in `shared.jose` and are re-exported here.

A client sends the same token with every request for its whole lifetime, and a full check (RSA
signature included) costs about 65 µs of CPU. So a token that passed is remembered (exactly that
token, for one verifier): later requests with it are checked only for what can change since, its
expiry and whether its key is still the one published under its `kid` (a key withdrawn from the
JWKS, or replaced, refuses its tokens at once).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError

from shared.jose import (
    KeySource,
    PublicKey,
    Refusal,
    TokenRefused,
    verify_signed,
)
from shared.problems import InsufficientScope, InvalidToken, MissingToken

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
        self._denied: Callable[[str], Awaitable[bool]] | None = None
        self._verified: dict[str, tuple[AccessClaims, str | None, PublicKey]] = {}
        self._cache_size = cache_size
        self._algorithms = tuple(algorithms)
        self._leeway = leeway
        self._required_scope = required_scope
        # Stateless between tokens ("now" is read at each validation), so built once.
        self._registry = jwt.JWTClaimsRegistry(
            leeway=leeway,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
        )

    def refuse_subjects(self, denied: Callable[[str], Awaitable[bool]]) -> None:
        """Refuse the tokens of every subject `denied` names (erased accounts: shared/denylist.py)."""
        self._denied = denied

    async def verify(self, token: str) -> AccessClaims:
        """The token's claims, or InvalidToken saying (briefly, without secrets) what was wrong."""
        claims = await self._verify_cached(token)
        if self._denied is not None and await self._denied(claims.subject):
            raise InvalidToken("the account was erased")
        return claims

    async def _verify_cached(self, token: str) -> AccessClaims:
        known = self._verified.get(token)
        if known is not None:
            claims, kid, key = known
            # Only time and the key set change a verdict: a withdrawn or replaced key, or expiry
            # (and the deny-list of erased subjects, checked by `verify` on every call).
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

    async def _verify(self, token: str) -> tuple[AccessClaims, str | None, PublicKey]:
        try:
            signed = await verify_signed(
                token, self._keys, algorithms=self._algorithms, typ=ACCESS_TOKEN_TYPE
            )
        except TokenRefused as refused:
            raise InvalidToken(_REFUSALS[refused.refusal]) from None
        claims = signed.claims
        try:
            self._registry.validate(claims)
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
        return verified, signed.kid, signed.key


_REFUSALS = {
    Refusal.NOT_COMPACT: "malformed token",
    Refusal.MALFORMED: "malformed token",
    Refusal.ALGORITHM: "unsupported algorithm",
    Refusal.TYPE: "not an access token",
    Refusal.NO_KID: "token has no key id",
    Refusal.UNKNOWN_KEY: "unknown signing key",
    Refusal.SIGNATURE: "bad signature",
}


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
