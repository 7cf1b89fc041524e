"""Login throttling: failed logins counted per account and per client address, in Redis.

Each failure increments two counters that expire `window` seconds after the first failure. When
either reaches its limit, `/token` answers 429 with `Retry-After` (the counter's remaining time)
without checking the password. A successful login clears the account's counter (not the
address's, so one good account cannot launder an address's guesses).

When Redis cannot be reached, counting falls back to this process's memory with the same limits:
each replica then throttles on its own, so an attacker gets at most (replicas x limit) guesses per
window instead of the limit, and nobody is locked out by the outage. The fallback is logged and
counted in `/metrics` (`auth_login_throttle_fallback_total`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThrottleLimits:
    per_account: int
    per_address: int
    window: int


class _LocalCounters:
    """In-memory fixed-window counters, used only while Redis is unreachable."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, float]] = {}

    def _prune(self, now: float) -> None:
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}

    def get(self, key: str) -> tuple[int, int]:
        now = time.monotonic()
        count, expires = self._counts.get(key, (0, now))
        if expires <= now:
            return 0, 0
        return count, max(1, int(expires - now + 0.999))

    def incr(self, key: str, window: int) -> None:
        now = time.monotonic()
        self._prune(now)
        count, expires = self._counts.get(key, (0, now))
        if expires <= now:
            count, expires = 0, now + window
        self._counts[key] = (count + 1, expires)

    def delete(self, key: str) -> None:
        self._counts.pop(key, None)


class LoginThrottle:
    """Checks and records failed logins; every method survives a Redis outage."""

    def __init__(
        self, redis: Redis, *, prefix: str, limits: ThrottleLimits, registry: CollectorRegistry
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._limits = limits
        self._local = _LocalCounters()
        self._fallbacks = Counter(
            "auth_login_throttle_fallback",
            "Throttle operations served from process memory because Redis failed",
            registry=registry,
        )

    def _keys(self, account: str, address: str) -> tuple[str, str]:
        digest = hashlib.sha256(account.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{self._prefix}login-fail:account:{digest}", f"{self._prefix}login-fail:address:{address}"

    def _fallback(self, error: RedisError) -> None:
        self._fallbacks.inc()
        log.warning("login throttle using process memory: redis failed (%s)", type(error).__name__)

    async def retry_after(self, account: str, address: str) -> int | None:
        """Seconds until another attempt is allowed, or None when the attempt may proceed."""
        account_key, address_key = self._keys(account, address)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(account_key)
                pipe.ttl(account_key)
                pipe.get(address_key)
                pipe.ttl(address_key)
                account_count, account_ttl, address_count, address_ttl = await pipe.execute()
            counts = [
                (int(account_count or 0), int(account_ttl)),
                (int(address_count or 0), int(address_ttl)),
            ]
        except RedisError as error:
            self._fallback(error)
            a_count, a_ttl = self._local.get(account_key)
            b_count, b_ttl = self._local.get(address_key)
            counts = [(a_count, a_ttl), (b_count, b_ttl)]
        limits = (self._limits.per_account, self._limits.per_address)
        waits = [max(ttl, 1) for (count, ttl), limit in zip(counts, limits, strict=True) if count >= limit]
        return max(waits) if waits else None

    async def record_failure(self, account: str, address: str) -> None:
        account_key, address_key = self._keys(account, address)
        window = self._limits.window
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in (account_key, address_key):
                    # SET NX EX starts the window at the first failure; INCR keeps the TTL.
                    # (EXPIRE NX would say the same, but needs Redis 7; embedded Redis is 6.2.)
                    pipe.set(key, 0, ex=window, nx=True)
                    pipe.incr(key)
                await pipe.execute()
        except RedisError as error:
            self._fallback(error)
            self._local.incr(account_key, window)
            self._local.incr(address_key, window)

    async def record_success(self, account: str, address: str) -> None:
        account_key, _ = self._keys(account, address)
        self._local.delete(account_key)
        try:
            await self._redis.delete(account_key)
        except RedisError as error:
            self._fallback(error)
