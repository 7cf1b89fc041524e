"""Login throttling that nobody can turn against an account's owner: failures are counted per
(account, client address) and per client address, never per account alone, in Redis.

Each attempt first reserves its place in both counters, atomically (one Lua script): when either is
at its limit the attempt is refused with the seconds until that window ends, and nothing is counted.
N guesses sent in parallel against a limit of L therefore let at most L through; a check followed by
a separate increment would let all N through. A wrong password keeps its place (it is a failure); a
right one gives back its place in the address's counter and clears the (account, address) counter;
an attempt that ends in neither (the database failed) gives both back.

Someone guessing from elsewhere fills only their own address's counters: the owner, from theirs,
logs in as before. `clear(account)` forgets the account's counters at every address (a password
reset): each account's counters are named with a generation that it increments.

When Redis cannot be reached, counting falls back to this process's memory with the same rules:
each replica then throttles on its own (at most replicas x limit guesses per window), and nobody is
locked out by the outage. The fallback is logged and counted in `/metrics`
(`auth_login_throttle_fallback_total`).

These counters talk to redis-py directly, not through aiocache (which the OAuth state and the email
check cache use): the reservation is one Lua script over two keys, and `clear` one MULTI, and aiocache
has neither scripts nor transactions, only single-key get/set/increment/expire that would reopen the
race the script closes.
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

# KEYS: the (account, address) counter, the address counter. ARGV: their limits, then their windows.
# Returns 0 when the attempt may go on (both counted), else the seconds until it may be tried again.
_RESERVE = """
local counts = {}
for i = 1, 2 do
    counts[i] = redis.call('INCR', KEYS[i])
    if counts[i] == 1 then redis.call('EXPIRE', KEYS[i], ARGV[i + 2]) end
end
local wait = 0
for i = 1, 2 do
    if counts[i] > tonumber(ARGV[i]) then wait = math.max(wait, redis.call('TTL', KEYS[i]), 1) end
end
if wait > 0 then
    for i = 1, 2 do redis.call('DECR', KEYS[i]) end
end
return wait
"""
# KEYS: counters to give one place back in (never below zero). ARGV[1] == "clear": delete the first.
_GIVE_BACK = """
for i, key in ipairs(KEYS) do
    if i == 1 and ARGV[1] == 'clear' then
        redis.call('DEL', key)
    elseif tonumber(redis.call('GET', key) or '0') > 0 then
        redis.call('DECR', key)
    end
end
return 0
"""


@dataclass(frozen=True)
class ThrottleLimits:
    per_account_address: int
    account_address_window: int
    per_address: int
    address_window: int


class _LocalCounters:
    """In-memory fixed-window counters, used only while Redis is unreachable (the same rules)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, float]] = {}

    def _live(self, key: str, now: float) -> tuple[int, float]:
        count, expires = self._counts.get(key, (0, now))
        return (0, now) if expires <= now else (count, expires)

    def reserve(self, keys: tuple[str, str], limits: tuple[int, int], windows: tuple[int, int]) -> int:
        now = time.monotonic()
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        live = [self._live(key, now) for key in keys]
        waits = [
            max(1, int(expires - now + 0.999))
            for (count, expires), limit in zip(live, limits, strict=True)
            if count + 1 > limit
        ]
        if waits:
            return max(waits)
        for key, (count, expires), window in zip(keys, live, windows, strict=True):
            self._counts[key] = (count + 1, expires if count else now + window)
        return 0

    def give_back(self, keys: tuple[str, ...], *, clear_first: bool) -> None:
        now = time.monotonic()
        for i, key in enumerate(keys):
            count, expires = self._live(key, now)
            if i == 0 and clear_first:
                self._counts.pop(key, None)
            elif count > 0:
                self._counts[key] = (count - 1, expires)

    def bump(self, key: str, window: int) -> None:
        count, _ = self._live(key, time.monotonic())
        self._counts[key] = (count + 1, time.monotonic() + window)

    def get(self, key: str) -> int:
        return self._live(key, time.monotonic())[0]


class _Counters:
    """Counters in pairs of fixed windows, reserved atomically in Redis, in memory while it is down."""

    def __init__(self, redis: Redis, *, what: str, metric: str, registry: CollectorRegistry) -> None:
        self._what = what
        self.redis = redis
        self.local = _LocalCounters()
        self._reserve = redis.register_script(_RESERVE)
        self.give_back_script = redis.register_script(_GIVE_BACK)
        self._fallbacks = Counter(
            metric, "Operations served from process memory because Redis failed", registry=registry
        )

    def fallback(self, error: RedisError) -> None:
        self._fallbacks.inc()
        log.warning("%s using process memory: redis failed (%s)", self._what, type(error).__name__)

    async def reserve(
        self, keys: tuple[str, str], limits: tuple[int, int], windows: tuple[int, int]
    ) -> int | None:
        """Count one in both, or neither: None when both had room, else seconds until both would."""
        try:
            wait = int(await self._reserve(keys=list(keys), args=[*limits, *windows]))
        except RedisError as error:
            self.fallback(error)
            wait = self.local.reserve(keys, limits, windows)
        return wait or None


class LoginThrottle:
    """Reserves, keeps or gives back login attempts; every method survives a Redis outage."""

    def __init__(
        self, redis: Redis, *, prefix: str, limits: ThrottleLimits, registry: CollectorRegistry
    ) -> None:
        self._counters = _Counters(
            redis, what="login throttle", metric="auth_login_throttle_fallback", registry=registry
        )
        self._redis = redis
        self._prefix = prefix
        self._limits = limits
        self._local = self._counters.local

    def _account(self, account: str) -> str:
        return hashlib.sha256(account.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _generation_key(self, account: str) -> str:
        return f"{self._prefix}login-gen:{self._account(account)}"

    async def _keys(self, account: str, address: str) -> tuple[str, str]:
        """The (account, address) counter of the account's current generation, and the address counter."""
        generation_key = self._generation_key(account)
        try:
            generation = int(await self._redis.get(generation_key) or 0)
        except RedisError as error:
            self._counters.fallback(error)
            generation = self._local.get(generation_key)
        pair = f"{self._prefix}login-fail:pair:{self._account(account)}:{generation}:{address}"
        return pair, f"{self._prefix}login-fail:address:{address}"

    async def reserve(self, account: str, address: str) -> int | None:
        """Count this attempt, or refuse it: None when it may go on, else seconds until it may."""
        keys = await self._keys(account, address)
        limits = (self._limits.per_account_address, self._limits.per_address)
        windows = (self._limits.account_address_window, self._limits.address_window)
        return await self._counters.reserve(keys, limits, windows)

    async def succeeded(self, account: str, address: str) -> None:
        """The right password: the (account, address) failures forgotten, the address's place given back."""
        await self._return(account, address, clear_pair=True)

    async def undecided(self, account: str, address: str) -> None:
        """The attempt ended without a verdict on the password (an outage): both places given back."""
        await self._return(account, address, clear_pair=False)

    async def _return(self, account: str, address: str, *, clear_pair: bool) -> None:
        keys = await self._keys(account, address)
        try:
            await self._counters.give_back_script(keys=list(keys), args=["clear" if clear_pair else "keep"])
        except RedisError as error:
            self._counters.fallback(error)
            self._local.give_back(keys, clear_first=clear_pair)

    async def clear(self, account: str) -> None:
        """Forget the account's failures at every address (its counters start a new generation)."""
        key, window = self._generation_key(account), self._limits.account_address_window
        self._local.bump(key, window)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, window)  # once its counters have expired, generation 0 is fresh again
                await pipe.execute()
        except RedisError as error:
            self._counters.fallback(error)


@dataclass(frozen=True)
class MailLimits:
    """Mails of one kind to one address: at most `per_minute` a minute and `per_day` a day (API.md)."""

    per_minute: int = 1
    per_day: int = 10


class MailLimiter:
    """Counts the mails asked for per (kind, address), whether or not an account has that address, so
    the answer never tells which addresses have one; survives a Redis outage like the login throttle."""

    def __init__(self, redis: Redis, *, prefix: str, limits: MailLimits, registry: CollectorRegistry) -> None:
        self._counters = _Counters(
            redis, what="mail limit", metric="auth_mail_limit_fallback", registry=registry
        )
        self._prefix = prefix
        self._limits = limits

    async def reserve(self, kind: str, email: str) -> int | None:
        """Count one mail of `kind` to `email`: None when it may be sent, else seconds until one may."""
        digest = hashlib.sha256(email.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()[:32]
        base = f"{self._prefix}mail-limit:{kind}:{digest}"
        return await self._counters.reserve(
            (f"{base}:minute", f"{base}:day"), (self._limits.per_minute, self._limits.per_day), (60, 86400)
        )
