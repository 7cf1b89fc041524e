"""Email verification at signup: Hunter's Email Verifier, behind a small interface, with a Redis cache.

`HunterEmailVerifier.verify` asks `GET {base}/v2/email-verifier?email=...&api_key=...` and always
returns an `EmailCheck`: Hunter's verdict (200), or `unchecked` with a short reason when Hunter
cannot say (still 202 after the last poll, timeout, connection error, 5xx, 403 rate limit, 429 out
of credits, 401 bad key, 222, 400, 451, an odd body). Signups fail open: only a verdict of invalid
or disposable refuses one, and that is the use case's decision, not this module's.

The API key travels in the query string, so no message here is built from an aiohttp exception's
text (which can carry the URL): only from its type.

`CachedEmailVerifier` keeps verdicts per address (lower-cased, hashed in the key) for a TTL, in Redis
through aiocache (a JSON get/set with a TTL), so repeated signups, refused ones included, spend no
credits; `unchecked` is never cached, and a Redis that fails only means no cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiocache import RedisCache
from redis.exceptions import RedisError

from services.auth.adapters.polling import Unreachable, failure_reason, poll_while_pending
from services.auth.domain.models import UNCHECKED, EmailCheck
from services.auth.domain.ports import EmailVerifier

log = logging.getLogger(__name__)

HUNTER = "hunter"
HUNTER_STATUSES = frozenset({"valid", "invalid", "accept_all", "webmail", "disposable", "unknown"})
# Why Hunter gave no verdict, by HTTP status (STACK.md); anything else is http_<status>.
_REASONS = {
    202: "still_verifying",
    222: "remote_server_error",
    400: "bad_request",
    401: "invalid_api_key",
    403: "rate_limited",
    429: "out_of_credits",
    451: "processing_refused",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


class HunterEmailVerifier:
    """Hunter's Email Verifier over the service's shared HTTP session, polling while it answers 202."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str,
        timeout: float,
        max_polls: int,
        poll_interval: float,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._session = session
        self._api_key = api_key
        self._url = base_url.rstrip("/") + "/v2/email-verifier"
        self._timeout = timeout
        self._max_polls = max_polls
        self._poll_interval = poll_interval
        self._clock = clock

    def __repr__(self) -> str:
        return f"HunterEmailVerifier(url={self._url!r})"  # never the key

    def _unchecked(
        self, reason: str, http_status: int | None = None, *, level: int = logging.WARNING
    ) -> EmailCheck:
        log.log(
            level,
            "email verification unavailable; signup proceeds unchecked",
            extra={"verifier": HUNTER, "reason": reason, "http_status": http_status},
        )
        return EmailCheck(status=UNCHECKED, source=HUNTER, checked_at=self._clock(), reason=reason)

    def _verdict(self, body: Any) -> EmailCheck:
        data = body.get("data") if isinstance(body, dict) else None
        status = data.get("status") if isinstance(data, dict) else None
        if status not in HUNTER_STATUSES:
            return self._unchecked("malformed_answer", 200)
        assert isinstance(data, dict)
        score = data.get("score")
        if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 100:
            score = None
        return EmailCheck(status=str(status), source=HUNTER, checked_at=self._clock(), score=score)

    async def _ask(self, email: str) -> tuple[int, Any]:
        """One call: the HTTP status and, for a 200, the decoded body."""
        params = {"email": email, "api_key": self._api_key}
        async with (
            asyncio.timeout(self._timeout),
            self._session.get(
                self._url,
                params=params,
                headers={"Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response,
        ):
            if response.status != 200:
                return response.status, None
            return 200, await response.json(content_type=None)

    async def verify(self, email: str) -> EmailCheck:
        """Hunter's verdict on `email`, or `unchecked` with a reason; never raises for Hunter's sake."""
        try:
            answer = await poll_while_pending(
                lambda: self._ask(email), attempts=self._max_polls, interval=self._poll_interval
            )
        except (ValueError, UnicodeDecodeError):
            return self._unchecked("malformed_answer", 200)
        if isinstance(answer, Unreachable):
            return self._unchecked(answer.reason)
        status, body = answer
        if status == 200:
            return self._verdict(body)
        # A bad key fails every signup's check until someone fixes the configuration.
        level = logging.ERROR if status == 401 else logging.WARNING
        return self._unchecked(failure_reason(status, _REASONS), status, level=level)


class CachedEmailVerifier:
    """Verdicts per address in Redis for `ttl` seconds; `unchecked` is asked again next time."""

    def __init__(self, verifier: EmailVerifier, cache: RedisCache, *, prefix: str, ttl: int) -> None:
        self._verifier = verifier
        self._cache = cache  # JSON values (shared.resources.aiocache_ctx)
        self._namespace = f"{prefix}email-check"
        self._ttl = ttl

    @staticmethod
    def _key(email: str) -> str:
        return hashlib.sha256(email.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()

    async def _cached(self, key: str) -> EmailCheck | None:
        try:
            record = await self._cache.get(key, namespace=self._namespace)
        except RedisError as error:
            log.warning("email check cache unavailable (%s); asking the verifier", type(error).__name__)
            return None
        except ValueError:  # json.JSONDecodeError is one; an entry we cannot read is a miss
            return None
        if record is None:
            return None
        try:
            return EmailCheck.from_record(record)
        except ValueError:
            return None

    async def verify(self, email: str) -> EmailCheck:
        key = self._key(email)
        cached = await self._cached(key)
        if cached is not None:
            return cached
        check = await self._verifier.verify(email)
        if check.checked and self._ttl > 0:
            try:
                await self._cache.set(key, check.as_record(), ttl=self._ttl, namespace=self._namespace)
            except RedisError as error:
                log.warning("email check not cached (%s)", type(error).__name__)
        return check
