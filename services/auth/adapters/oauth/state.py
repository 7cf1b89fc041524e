"""Pending sign-ins between the redirect to a provider and its callback, kept in Redis through aiocache.

`create` draws a random `state` (256 bits), a PKCE pair and a nonce, and stores what the callback
needs under the state for `ttl` seconds (aiocache's `set`, JSON); `consume` reads and deletes it in
one GETDEL (aiocache has no atomic get-and-delete: its `get` then `delete` would let two callbacks
share a state, so the command goes through its `raw`), so a state is good for one callback only.
Redis trouble is `StateStoreUnavailable` (the caller answers 503).
"""

from __future__ import annotations

import logging
import re
import secrets

from aiocache import RedisCache
from redis.exceptions import RedisError

from services.auth.adapters.oauth.providers import new_pkce
from services.auth.domain.errors import StateStoreUnavailable
from services.auth.domain.models import PendingFlow, StoredFlow

log = logging.getLogger(__name__)

DEFAULT_TTL = 600
STATE_BYTES = 32  # 256 bits; 43 characters of base64url
NONCE_BYTES = 32
KEY_NAMESPACE = "oauth:state"  # aiocache puts a ":" between it and the state
_STATE = re.compile(r"[A-Za-z0-9_-]{43}")


class OAuthStateStore:
    """Single-use sign-in states under `<prefix>oauth:state:<state>`, each living `ttl` seconds."""

    def __init__(self, cache: RedisCache, *, prefix: str, ttl: int = DEFAULT_TTL) -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second")
        self._cache = cache  # JSON values (shared.resources.aiocache_ctx)
        self._namespace = prefix + KEY_NAMESPACE
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
            await self._cache.set(state, stored, ttl=self._ttl, namespace=self._namespace)
        except (RedisError, OSError, TimeoutError) as error:
            raise StateStoreUnavailable(type(error).__name__) from None
        return PendingFlow(state=state, code_verifier=verifier, code_challenge=challenge, nonce=nonce)

    async def consume(self, state: str) -> StoredFlow | None:
        """The flow stored under `state`, deleted as it is read; None when unknown, used or expired."""
        if not _STATE.fullmatch(state):
            return None  # no state we issued looks like this: do not ask Redis
        try:
            raw = await self._cache.raw("getdel", self._cache.build_key(state, self._namespace))
        except (RedisError, OSError, TimeoutError) as error:
            raise StateStoreUnavailable(type(error).__name__) from None
        if raw is None:
            return None
        try:
            stored = self._cache.serializer.loads(raw)
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
