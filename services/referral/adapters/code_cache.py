"""The Redis cache in front of the two hot reads: a code by its owner's email, and by its text.

The database stays the source of truth; the cache only ever answers what the database said, and:
- an entry never outlives its code's expiry (its TTL stops there, and the use cases check expiry again);
- writers overwrite (`SET`): creating a code writes it, deleting one writes a tombstone, so the very
  next request sees the change; readers only fill gaps (`SET NX`), so a reader that looked at the
  database just before a write cannot put the old state back afterwards;
- unknown emails and codes are cached briefly, so a flood of lookups does not reach the database;
- codes never change owner or come back once deleted, so a tombstone is always right.
When Redis fails, the failure is logged (at most every few seconds), counted in /metrics, and reads
bypass the cache for a short while (a breaker), so requests go straight to the database instead of
each waiting for Redis to time out. Changes are still written through; a change Redis did not take
(an outage) is kept in process memory and written before this process reads or fills the cache
again, so an entry from before the outage (the code a user deleted meanwhile) is never served once
Redis is back. (Until then another replica may read it; the write paths that matter, activation,
re-check the database in the same statement anyway.) Past `MAX_UNWRITTEN` such changes, every entry
of the namespace is dropped instead.

Reads and writes go through the service's redis-py client (one pool, one set of timeouts), not
aiocache: its per-call machinery (`wait_for`, plugin hooks, key building, decoding) cost about 55 µs
of CPU more than the 110-120 µs of a GET through redis-py itself, and 40 µs more a SET (20,000 calls
each against a local Redis); and aiocache 0.12 cannot use the service's client (it builds a pool of
its own from host and port). The client's socket timeout bounds a read; a write is also bounded by
`timeout` as a whole. The lookup by email is also answered from a near cache in process memory
(shared/near_cache.py), which Redis keeps coherent by telling every process of each change to an
email entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.referral.domain.models import ReferralCode
from services.referral.domain.ports import ABSENT, Absent
from shared.near_cache import NearCache

log = logging.getLogger(__name__)

BREAKER_SECONDS = 5.0
LOG_EVERY_SECONDS = 10.0
MAX_UNWRITTEN = 10_000
MAX_MISSES_REMEMBERED = 10_000
_CACHE_ERRORS = (RedisError, OSError, asyncio.TimeoutError, ValueError, TypeError)


@dataclass(frozen=True)
class CodeCacheSettings:
    ttl: int
    negative_ttl: int
    timeout: float
    near_size: int = 0  # entries of the in-process cache of lookups by email; 0: none
    near_ttl: float = 30.0


def _dump(code: ReferralCode) -> dict[str, Any]:
    return {
        "id": str(code.id),
        "code": code.code,
        "owner_id": str(code.owner_id),
        "owner_email": code.owner_email,
        "expires_at": code.expires_at.isoformat(),
        "created_at": code.created_at.isoformat(),
        "deleted_at": code.deleted_at.isoformat() if code.deleted_at else None,
        # The limit never changes; `uses` does, so it is not kept (the writes count it in the database).
        "max_uses": code.max_uses,
    }


def _load(value: dict[str, Any]) -> ReferralCode:
    return ReferralCode(
        id=uuid.UUID(value["id"]),
        code=value["code"],
        owner_id=uuid.UUID(value["owner_id"]),
        owner_email=value["owner_email"],
        expires_at=datetime.fromisoformat(value["expires_at"]),
        created_at=datetime.fromisoformat(value["created_at"]),
        deleted_at=datetime.fromisoformat(value["deleted_at"]) if value["deleted_at"] else None,
        max_uses=value.get("max_uses"),
    )


class RedisCodeCache:
    """Cached answers of `CodeRepository.by_code` and `.active_by_email` (the CodeCache port); never
    raises on Redis trouble."""

    def __init__(
        self, redis: Redis, *, prefix: str, settings: CodeCacheSettings, registry: CollectorRegistry
    ):
        # Keys are `<prefix without its trailing colons>:<key>`, as aiocache's namespaces made them.
        namespace = prefix.rstrip(":")
        self._namespace = f"{namespace}:" if namespace else ""
        self._redis = redis
        self._settings = settings
        self.near = NearCache(
            redis, self._full_key(self._email_key("")), size=settings.near_size, ttl=settings.near_ttl
        )
        self._open_until = 0.0
        self._last_logged = 0.0
        # Changes Redis missed: key -> (value, monotonic deadline), replayed before the cache is read
        # again; `_lost` when there were too many to keep (the namespace is then dropped instead).
        self._unwritten: dict[str, tuple[Any, float]] = {}
        self._lost = False
        self._changing = asyncio.Lock()
        self._lookups = Counter(
            "referral_cache_lookups", "Code cache lookups by result", ["result"], registry=registry
        )
        self._errors = Counter("referral_cache_errors", "Redis failures of the code cache", registry=registry)
        # Lookups by email that missed, with the near cache's generation at that moment.
        self._missed: dict[str, int] = {}
        self._counted = {
            result: self._lookups.labels(result) for result in ("near", "hit", "miss", "error", "bypassed")
        }
        # The public lookup by email alone, by where its answer came from: process memory, Redis, or
        # the database (a Redis miss, error or bypass: the use case reads the database then). The
        # counter above mixes it with the lookups by code text (activations, signups).
        self._email_answers = Counter(
            "referral_email_lookups",
            "Lookups of a code by its owner's email, by where the answer came from",
            ["source"],
            registry=registry,
        )
        self._answered = {
            source: self._email_answers.labels(source) for source in ("near", "redis", "database")
        }

    # --- plumbing --------------------------------------------------------------------------------

    def _available(self) -> bool:
        return time.monotonic() >= self._open_until

    def _failed(self, error: BaseException) -> None:
        self._errors.inc()
        now = time.monotonic()
        self._open_until = now + BREAKER_SECONDS
        if now - self._last_logged >= LOG_EVERY_SECONDS:
            self._last_logged = now
            log.warning(
                "code cache unavailable, reading the database for %.0f s: %s",
                BREAKER_SECONDS,
                type(error).__name__,
            )

    def _full_key(self, key: str) -> str:
        return self._namespace + key

    async def _get(self, key: str) -> Any:
        if not self._available() or not await self._replay():
            self._counted["bypassed"].inc()
            return None
        try:
            raw = await self._redis.get(self._full_key(key))
            value = None if raw is None else json.loads(raw)
        except _CACHE_ERRORS as error:
            self._failed(error)
            self._counted["error"].inc()
            return None
        self._counted["miss" if value is None else "hit"].inc()
        return value

    async def _write(self, key: str, value: Any, ttl: int, *, overwrite: bool) -> bool:
        # Fills skip a Redis known to be failing; changes are always attempted, and one that fails is
        # kept for `_replay`, so that a Redis that comes back never serves an entry it should replace.
        # A change also drops the key from this process's near cache, before and after Redis has it.
        if not overwrite:
            if not self._available() or not await self._replay():
                return False
            try:
                async with asyncio.timeout(self._settings.timeout):
                    written = await self._redis.set(self._full_key(key), json.dumps(value), ex=ttl, nx=True)
            except _CACHE_ERRORS as error:
                self._failed(error)
                return False
            return bool(written)  # False: somebody wrote first, and writers win
        self.near.evict((self._full_key(key),))
        async with self._changing:
            try:
                async with asyncio.timeout(self._settings.timeout):
                    await self._redis.set(self._full_key(key), json.dumps(value), ex=ttl)
            except _CACHE_ERRORS as error:
                self._failed(error)
                self._keep(key, value, ttl)
            else:
                self._unwritten.pop(key, None)
            finally:
                self.near.evict((self._full_key(key),))
        return True

    def _keep(self, key: str, value: Any, ttl: int) -> None:
        self._unwritten.pop(key, None)  # the newest change of a key goes last
        self._unwritten[key] = (value, time.monotonic() + ttl)
        if len(self._unwritten) > MAX_UNWRITTEN:
            self._unwritten.clear()
            self._lost = True

    async def _replay(self) -> bool:
        """Write the changes Redis missed; False (and the breaker opens again) while it still fails."""
        if not (self._unwritten or self._lost):
            return True
        async with self._changing:
            if not (self._unwritten or self._lost):
                return True  # replayed meanwhile
            try:
                if self._lost:
                    async for found in self._redis.scan_iter(match=f"{self._namespace}*", count=1000):
                        await self._redis.delete(found)
                    self.near.clear()
                    self._lost = False
                while self._unwritten:
                    key, (value, deadline) = next(iter(self._unwritten.items()))
                    ttl = int(deadline - time.monotonic())
                    if ttl >= 1:
                        await self._redis.set(self._full_key(key), json.dumps(value), ex=ttl)
                    del self._unwritten[key]
            except _CACHE_ERRORS as error:
                self._failed(error)
                return False
        log.info("code cache: changes made during the Redis outage written")
        return True

    def _code_ttl(self, code: ReferralCode) -> int:
        left = (code.expires_at - datetime.now(UTC)).total_seconds()
        return max(1, min(self._settings.ttl, int(left)))

    @staticmethod
    def _email_key(email: str) -> str:
        return f"email:{email.lower()}"

    @staticmethod
    def _code_key(code: str) -> str:
        return f"code:{code.lower()}"

    # --- reads -----------------------------------------------------------------------------------

    async def by_code(self, code: str) -> ReferralCode | Absent | None:
        """The cached code, ABSENT when the database had none, None when not cached."""
        value = await self._get(self._code_key(code))
        if value is None:
            return None
        if value.get("absent"):
            return ABSENT
        return _load(value)

    async def active_by_email(self, email: str) -> ReferralCode | Absent | None:
        """The cached code of this email's owner (it may have expired since; ABSENT: none), None when
        not cached."""
        key = self._email_key(email)
        full_key = self._full_key(key)
        found: ReferralCode | Absent | None = self.near.get(full_key)
        if found is not None:
            self._counted["near"].inc()
            self._answered["near"].inc()
        else:
            generation = self.near.generation
            value = await self._get(key)
            if value is None:
                self._answered["database"].inc()
                if len(self._missed) >= MAX_MISSES_REMEMBERED:
                    self._missed.clear()
                self._missed[full_key] = generation  # for `fill_email`, after the database read
                return None
            self._answered["redis"].inc()
            found = ABSENT if value.get("absent") else _load(value)
            self.near.put(full_key, found, generation)
        return found

    # --- fills (readers: only where nothing is cached yet) -------------------------------------

    async def fill_code(self, text: str, code: ReferralCode | None) -> None:
        if code is None:
            await self._write(
                self._code_key(text), {"absent": True}, self._settings.negative_ttl, overwrite=False
            )
        else:
            await self._write(self._code_key(text), _dump(code), self._code_ttl(code), overwrite=False)

    async def fill_email(self, email: str, code: ReferralCode | None) -> None:
        # The database's answer is kept in process memory too when this fill is what Redis holds,
        # unless an invalidation arrived since the lookup missed (a change raced the database read).
        key = self._email_key(email)
        full_key = self._full_key(key)
        generation = self._missed.pop(full_key, None)
        keep = generation is not None and self.near.enabled
        if keep:
            self.near.expect_echo(full_key)
        if code is None:
            written = await self._write(key, {"absent": True}, self._settings.negative_ttl, overwrite=False)
        else:
            written = await self._write(key, _dump(code), self._code_ttl(code), overwrite=False)
        if keep and generation is not None:
            if written:
                self.near.put(full_key, ABSENT if code is None else code, generation)
            else:
                self.near.cancel_echo(full_key)

    # --- writes (writers: always overwrite) ------------------------------------------------------

    async def code_created(self, code: ReferralCode) -> None:
        ttl = self._code_ttl(code)
        await self._write(self._code_key(code.code), _dump(code), ttl, overwrite=True)
        await self._write(self._email_key(code.owner_email), _dump(code), ttl, overwrite=True)

    async def code_deleted(self, code: ReferralCode) -> None:
        await self._write(self._code_key(code.code), _dump(code), self._settings.ttl, overwrite=True)
        await self._write(
            self._email_key(code.owner_email), {"absent": True}, self._settings.ttl, overwrite=True
        )

    async def user_erased(self, codes: Iterable[ReferralCode], emails: Iterable[str]) -> None:
        # The texts keep their (now anonymous, deleted) codes; the addresses an "absent" tombstone that
        # outlives any fill racing the erasure, for the short negative TTL only: the key names the address.
        for code in codes:
            await self._write(self._code_key(code.code), _dump(code), self._settings.ttl, overwrite=True)
        for email in emails:
            await self._write(
                self._email_key(email), {"absent": True}, self._settings.negative_ttl, overwrite=True
            )
