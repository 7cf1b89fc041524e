"""Signed JWTs checked against a JSON Web Key Set: the one JWT/JWKS implementation (joserfc).

`verify_signed` is the check both token kinds share: the header read within bounds, its `alg` one
of an exact list (never `none`, and joserfc refuses an HMAC with an RSA or EC key whatever the
list), the key chosen by `kid` from a `KeySource`, the signature. Claims are the caller's part: the
access-token verifier (`shared.tokens`) and the OpenID Connect ID-token check of the auth service's
sign-in each validate their own. `RemoteJWKS` is the one JWKS fetched over HTTP and cached, fetched
again when a token names a `kid` it lacks (at most once per `min_refresh_interval`, however many
requests ask at once) and when older than `max_age`; a failed fetch keeps the keys already known.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

log = logging.getLogger(__name__)

PublicKey = RSAKey | ECKey
MAX_TOKEN_LENGTH = 8192
MAX_HEADER_LENGTH = 1024  # headers are about 120 characters; a long one is not parsed at all


class Refusal(enum.Enum):
    """The step of `verify_signed` a token failed; each caller words it for its own answers."""

    NOT_COMPACT = "not three base64url parts"
    MALFORMED = "unreadable or oversized header"
    ALGORITHM = "alg not in the accepted list"
    TYPE = "typ not the required one"
    NO_KID = "no kid (or no single key to use without one)"
    UNKNOWN_KEY = "no key published under the kid"
    SIGNATURE = "signature does not verify"


class TokenRefused(Exception):
    """A token failed the shared check; `refusal` says which step (and holds no part of the token)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


class KeySource(Protocol):
    """Where verification keys come from."""

    async def key_for(self, kid: str | None) -> PublicKey | None:
        """The key published under `kid` (None: the only key, if exactly one), or None."""


def _parse(document: Any) -> tuple[dict[str, PublicKey], list[PublicKey]]:
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a key set")
    by_kid: dict[str, PublicKey] = {}
    every: list[PublicKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC"):
            continue
        try:
            key: PublicKey = RSAKey.import_key(dict(entry)) if kty == "RSA" else ECKey.import_key(dict(entry))
        except (JoseError, ValueError, TypeError):
            continue
        every.append(key)
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid[kid] = key
    return by_kid, every


def parse_jwks(document: Any) -> dict[str, PublicKey]:
    """RSA and EC signing keys by kid from a JWKS; other and broken entries are skipped (ValueError:
    not a JWKS at all)."""
    return _parse(document)[0]


class StaticKeySource:
    """A fixed set of public keys (the auth service verifies with the keys it publishes)."""

    def __init__(self, keys: Sequence[PublicKey]) -> None:
        self._keys = {key.kid: key for key in keys if key.kid}
        self._only = keys[0] if len(keys) == 1 else None

    async def key_for(self, kid: str | None) -> PublicKey | None:
        return self._only if kid is None else self._keys.get(kid)


class _FetchFailed(Exception):
    """Why one JWKS fetch failed, in a few words (never the response body)."""


class RemoteJWKS:
    """A JWKS fetched over HTTP, cached, refreshed on an unknown `kid` and every `max_age` seconds.

    `fetch_error` says why the last fetch failed (None after one that worked), for callers that
    report it; redirects are not followed (the URL is configured or comes from discovery).
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 3.0,
        max_age: float = 300.0,
        min_refresh_interval: float = 10.0,
    ) -> None:
        self.url = url
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_age = max_age
        self._min_refresh_interval = min_refresh_interval
        self._keys: dict[str, PublicKey] = {}
        self._only: PublicKey | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetch_error: str | None = None

    async def key_for(self, kid: str | None) -> PublicKey | None:
        now = time.monotonic()
        key = self._only if kid is None else self._keys.get(kid)
        if key is not None and now - self._fetched_at < self._max_age:
            return key
        if now - self._fetched_at >= self._min_refresh_interval:
            await self.refresh()
        return self._only if kid is None else self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the JWKS once even when many requests ask at the same moment."""
        started = time.monotonic()
        async with self._lock:
            if self._fetched_at >= started:
                return  # another request refreshed while this one waited
            try:
                self._keys, every = await self._fetch()
                self._only = every[0] if len(every) == 1 else None
                self.fetch_error = None
            except _FetchFailed as error:
                # Keep serving with the keys already known; try again after the interval.
                self.fetch_error = str(error)
                log.warning("JWKS fetch from %s failed: %s", self.url, error)
            self._fetched_at = time.monotonic()

    async def _fetch(self) -> tuple[dict[str, PublicKey], list[PublicKey]]:
        try:
            async with self._session.get(self.url, timeout=self._timeout, allow_redirects=False) as response:
                if response.status != 200:
                    raise _FetchFailed(f"HTTP {response.status}")
                try:
                    document = await response.json(content_type=None)
                except ValueError:
                    raise _FetchFailed("not JSON") from None
        except TimeoutError:
            raise _FetchFailed("no answer in time") from None
        except aiohttp.ClientError as error:
            raise _FetchFailed(f"unreachable ({type(error).__name__})") from None
        try:
            return _parse(document)
        except ValueError:
            raise _FetchFailed("not a key set") from None


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def read_header(token: str, *, max_length: int = MAX_TOKEN_LENGTH) -> Mapping[str, Any]:
    """The JOSE header of a compact JWS, unverified; TokenRefused when there is none to read."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRefused(Refusal.NOT_COMPACT)
    # Nothing long is parsed (no deep nesting reaches the JSON parser).
    if len(token) > max_length or len(parts[0]) > MAX_HEADER_LENGTH:
        raise TokenRefused(Refusal.MALFORMED)
    try:
        header = _b64json(parts[0])
    except (ValueError, RecursionError, binascii.Error, UnicodeEncodeError):
        raise TokenRefused(Refusal.MALFORMED) from None
    if not isinstance(header, dict):
        raise TokenRefused(Refusal.MALFORMED)
    return header


@dataclass(frozen=True, slots=True)
class SignedToken:
    """A token whose signature checked out: its header and (not yet validated) claims, and the key."""

    header: Mapping[str, Any]
    claims: dict[str, Any]
    kid: str | None
    key: PublicKey


async def verify_signed(
    token: str,
    keys: KeySource,
    *,
    algorithms: Sequence[str],
    typ: str | None = None,
    require_kid: bool = True,
    max_length: int = MAX_TOKEN_LENGTH,
) -> SignedToken:
    """Check a compact JWS's header and signature; TokenRefused naming the step that failed.

    `algorithms` is the exact list accepted, `typ` (when given) the header's required `typ`. Without
    `require_kid` a token with no usable `kid` is checked with the key set's only key, if it has one.
    """
    header = read_header(token, max_length=max_length)
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in algorithms:
        raise TokenRefused(Refusal.ALGORITHM)
    if typ is not None and header.get("typ") != typ:
        raise TokenRefused(Refusal.TYPE)
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        if require_kid:
            raise TokenRefused(Refusal.NO_KID)
        kid = None
    key = await keys.key_for(kid)
    if key is None:
        raise TokenRefused(Refusal.UNKNOWN_KEY if kid is not None else Refusal.NO_KID)
    try:
        decoded = jwt.decode(token, key, algorithms=algorithms)
    except (JoseError, ValueError, TypeError):
        raise TokenRefused(Refusal.SIGNATURE) from None
    return SignedToken(decoded.header, decoded.claims, kid, key)
