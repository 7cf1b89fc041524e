"""Pending sign-ins between the redirect to a provider and its callback, kept in Redis.

`create` draws a random `state` (256 bits), a PKCE pair and a nonce, and stores what the callback
needs under the state for `ttl` seconds; `consume` reads and deletes it in one GETDEL, so a state
is good for one callback only. Redis trouble is `StateStoreUnavailable` (the caller answers 503).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.auth.oauth.providers import new_pkce

log = logging.getLogger(__name__)

DEFAULT_TTL = 600
STATE_BYTES = 32  # 256 bits; 43 characters of base64url
NONCE_BYTES = 32
KEY_NAMESPACE = "oauth:state:"
_STATE = re.compile(r"[A-Za-z0-9_-]{43}")


class StateStoreUnavailable(Exception):
    """Redis could not be asked (unreachable, timeout, error): the flow cannot start or finish now."""


@dataclass(frozen=True, slots=True)
class PendingFlow:
    """A sign-in just started: `state` and `code_challenge` and `nonce` go to the provider."""

    state: str
    code_verifier: str
    code_challenge: str
    nonce: str


@dataclass(frozen=True, slots=True)
class StoredFlow:
    """What the callback gets back for its state. The caller checks `provider` against the callback's."""

    provider: str
    code_verifier: str
    nonce: str
    referral_code: str | None


class OAuthStateStore:
    """Single-use sign-in states under `<prefix>oauth:state:<state>`, each living `ttl` seconds."""

    def __init__(self, redis: Redis, *, prefix: str, ttl: int = DEFAULT_TTL) -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second")
        self._redis = redis
        self._prefix = prefix + KEY_NAMESPACE
        self._ttl = ttl

    async def create(self, provider: str, *, referral_code: str | None) -> PendingFlow:
        """Start a flow for `provider`, remembering the referral code the user came with."""
        state = secrets.token_urlsafe(STATE_BYTES)
        verifier, challenge = new_pkce()
        nonce = secrets.token_urlsafe(NONCE_BYTES)
        stored = {
            "provider": provider,
            "code_verifier": verifier,
            "nonce": nonce,
            "referral_code": referral_code,
        }
        try:
            await self._redis.set(self._prefix + state, json.dumps(stored), ex=self._ttl)
        except (RedisError, OSError, TimeoutError) as error:
            raise StateStoreUnavailable(type(error).__name__) from None
        return PendingFlow(state=state, code_verifier=verifier, code_challenge=challenge, nonce=nonce)

    async def consume(self, state: str) -> StoredFlow | None:
        """The flow stored under `state`, deleted as it is read; None when unknown, used or expired."""
        if not _STATE.fullmatch(state):
            return None  # no state we issued looks like this: do not ask Redis
        try:
            raw = await self._redis.getdel(self._prefix + state)
        except (RedisError, OSError, TimeoutError) as error:
            raise StateStoreUnavailable(type(error).__name__) from None
        if raw is None:
            return None
        try:
            stored = json.loads(raw)
            referral_code = stored["referral_code"]
            return StoredFlow(
                provider=str(stored["provider"]),
                code_verifier=str(stored["code_verifier"]),
                nonce=str(stored["nonce"]),
                referral_code=None if referral_code is None else str(referral_code),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable sign-in state in Redis; treated as unknown")
            return None
