"""Signing keys: loaded from configuration, published as JWKS, used to issue RS256 access tokens.

The configured PEM holds one or more RSA keys. The first private key signs; every key (private or
public-only) is published, so a key can be rotated without logging anyone out: put the new key
first, keep the old one after it until the last token it signed has expired, then drop it.
A key's `kid` is its RFC 7638 thumbprint, identical on every replica.
A key is generated only in dev mode, and then loudly.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey

from services.auth.domain.models import IssuedAccessToken
from services.auth.settings import AuthSettings
from shared.config import SettingsError
from shared.tokens import ACCESS_TOKEN_TYPE

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
MIN_RSA_BITS = 2048
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class KeyRing:
    """The signing key and every public key to publish (the signing key's included)."""

    signing_key: RSAKey
    public_keys: tuple[RSAKey, ...]

    def jwks(self) -> dict[str, Any]:
        """The RFC 7517 document of every published key."""
        keys = []
        for key in self.public_keys:
            entry: dict[str, Any] = dict(key.as_dict(private=False))
            entry.update({"use": "sig", "alg": ALGORITHM, "kid": key.kid})
            keys.append(entry)
        return {"keys": keys}


def _import(pem: str) -> RSAKey:
    try:
        key = RSAKey.import_key(pem)
    except Exception as error:
        raise SettingsError(
            f"a configured JWT key is not a valid RSA PEM key ({type(error).__name__})"
        ) from None
    raw = key.raw_value
    size = raw.key_size if isinstance(raw, (rsa.RSAPrivateKey, rsa.RSAPublicKey)) else 0
    if size < MIN_RSA_BITS:
        raise SettingsError(f"JWT keys must be RSA of at least {MIN_RSA_BITS} bits")
    key.ensure_kid()
    return key


def _public(key: RSAKey) -> RSAKey:
    public = RSAKey.import_key(key.as_dict(private=False))
    public.ensure_kid()
    return public


def parse_key_ring(pem_text: str) -> KeyRing:
    """Keys from PEM text; the first private key signs."""
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(pem_text)]
    if not blocks:
        raise SettingsError("no PEM key found in the JWT key configuration")
    keys = [_import(block) for block in blocks]
    signing = next((k for k in keys if k.is_private), None)
    if signing is None:
        raise SettingsError("the JWT key configuration holds no private key to sign with")
    published: list[RSAKey] = []
    for key in [signing, *keys]:
        if key.kid not in {k.kid for k in published}:
            published.append(_public(key))
    return KeyRing(signing, tuple(published))


def generate_pem() -> str:
    """A fresh RSA-2048 private key as PKCS#8 PEM."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def load_key_ring(settings: AuthSettings) -> KeyRing:
    """The configured keys; in dev mode with none configured, a generated key (with a warning)."""
    if settings.jwt_private_keys:
        return parse_key_ring(settings.jwt_private_keys)
    if settings.jwt_private_keys_file:
        try:
            text = Path(settings.jwt_private_keys_file).read_text()
        except OSError as error:
            raise SettingsError(f"cannot read AUTH_JWT_PRIVATE_KEYS_FILE: {error.strerror}") from None
        return parse_key_ring(text)
    if not settings.is_dev:
        raise SettingsError("no JWT signing key configured")
    log.warning("dev mode: no JWT key configured, signing with a generated key that dies with this process")
    return parse_key_ring(generate_pem())


class AccessTokenIssuer:
    """Signs RFC 9068 access tokens: `typ: at+jwt`, `kid`, iss/aud/sub/email/iat/exp/jti."""

    def __init__(self, ring: KeyRing, *, issuer: str, audience: str, ttl: int) -> None:
        self._key = ring.signing_key
        self._header = {"alg": ALGORITHM, "kid": ring.signing_key.kid, "typ": ACCESS_TOKEN_TYPE}
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl

    def issue(
        self,
        subject: uuid.UUID | str,
        *,
        email: str | None,
        audience: str | None = None,
        scope: Sequence[str] = (),
        ttl: int | None = None,
        email_verified: bool | None = None,
        session_id: uuid.UUID | None = None,
    ) -> IssuedAccessToken:
        """A signed token for `subject`; `audience`/`scope` override for service-to-service tokens.

        A user's token says whether their address is proven (`email_verified`) and which login it
        belongs to (`sid`, the refresh-token family: a password change keeps that one signed in).
        """
        now = int(time.time())
        lifetime = ttl or self._ttl
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": audience or self._audience,
            "sub": str(subject),
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
        }
        if email is not None:
            claims["email"] = email
        if email_verified is not None:
            claims["email_verified"] = email_verified
        if session_id is not None:
            claims["sid"] = str(session_id)
        if scope:
            claims["scope"] = " ".join(scope)
        token = jwt.encode(self._header, claims, self._key, algorithms=[ALGORITHM])
        return IssuedAccessToken(token, lifetime)
