"""Person enrichment after signup: a vendor interface, the Clearbit-compatible client, a scheduler.

Enrichment never delays a signup: the use case hands the new user to `EnrichmentScheduler.schedule`
after the commit, which starts a background task (at most `concurrency` of them call the vendor at
once) and returns at once. Every outcome is stored on the user as `profile`, so `/me` tells which
it was:

- `{"status": "found", "person": {...}, "source", "fetched_at"}` (200),
- `{"status": "not_found", "source", "fetched_at"}` (404),
- `{"status": "unavailable", "reason": ..., "source", "fetched_at"}`: still 202 after the last
  attempt (`reason` still_pending), timeout, connection error, or any other answer; the failure is
  also logged (a bad key, 401, at error level).

At shutdown the scheduler stops taking work, waits a bounded time for enrichments in flight, then
cancels the rest (their users keep a null `profile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import aiohttp

from services.auth.adapters.polling import Unreachable, failure_reason, poll_while_pending
from services.auth.domain.ports import UserRepository

log = logging.getLogger(__name__)

CLEARBIT = "clearbit"
# A person record is a few KB; anything far larger is not one, and is not stored.
MAX_PERSON_BYTES = 256 * 1024
MAX_PENDING = 10_000
_REASONS = {
    401: "invalid_api_key",
    402: "payment_required",
    403: "forbidden",
    422: "rejected_email",
    429: "rate_limited",
}

EnrichmentStatus = Literal["found", "not_found", "unavailable"]


@dataclass(frozen=True)
class EnrichmentResult:
    """What a vendor said about an address."""

    status: EnrichmentStatus
    person: Mapping[str, Any] | None = None
    reason: str | None = None


class PersonEnricher(Protocol):
    """A person-enrichment vendor. `find` never raises for the vendor's sake: it answers unavailable."""

    source: str

    async def find(self, email: str) -> EnrichmentResult: ...


def _unavailable(
    reason: str, http_status: int | None = None, *, level: int = logging.WARNING
) -> EnrichmentResult:
    log.log(
        level,
        "person enrichment unavailable",
        extra={"enricher": CLEARBIT, "reason": reason, "http_status": http_status},
    )
    return EnrichmentResult("unavailable", reason=reason)


class ClearbitPersonEnricher:
    """Clearbit's Person API (`GET /v2/people/find?email=`, HTTP Basic with the key), or a look-alike."""

    source = CLEARBIT

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str,
        timeout: float,
        max_attempts: int,
        retry_delay: float,
    ) -> None:
        self._session = session
        self._authorization = aiohttp.encode_basic_auth(api_key, "")
        self._url = base_url.rstrip("/") + "/v2/people/find"
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay

    def __repr__(self) -> str:
        return f"ClearbitPersonEnricher(url={self._url!r})"  # never the key

    async def _ask(self, email: str) -> tuple[int, bytes]:
        async with (
            asyncio.timeout(self._timeout),
            self._session.get(
                self._url,
                params={"email": email},
                headers={"Accept": "application/json", "Authorization": self._authorization},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response,
        ):
            if response.status != 200:
                return response.status, b""
            return 200, await response.content.read(MAX_PERSON_BYTES + 1)

    async def find(self, email: str) -> EnrichmentResult:
        answer = await poll_while_pending(
            lambda: self._ask(email), attempts=self._max_attempts, interval=self._retry_delay
        )
        if isinstance(answer, Unreachable):
            return _unavailable(answer.reason)
        status, raw = answer
        if status == 200:
            return self._person(raw)
        if status == 404:
            return EnrichmentResult("not_found")
        if status == 202:
            return _unavailable("still_pending", 202)
        reason = failure_reason(status, _REASONS)
        return _unavailable(reason, status, level=logging.ERROR if status == 401 else logging.WARNING)

    @staticmethod
    def _person(raw: bytes) -> EnrichmentResult:
        if len(raw) > MAX_PERSON_BYTES:
            return _unavailable("answer_too_large", 200)
        try:
            person = json.loads(raw)
        except ValueError:
            return _unavailable("malformed_answer", 200)
        if not isinstance(person, dict):
            return _unavailable("malformed_answer", 200)
        return EnrichmentResult("found", person=person)


def utc_now() -> datetime:
    return datetime.now(UTC)


def profile_record(result: EnrichmentResult, source: str, fetched_at: datetime) -> dict[str, Any]:
    """The JSON stored as the user's `profile`."""
    record: dict[str, Any] = {"status": result.status}
    if result.person is not None:
        record["person"] = dict(result.person)
    if result.reason is not None:
        record["reason"] = result.reason
    record["source"] = source
    record["fetched_at"] = fetched_at.isoformat()
    return record


@dataclass
class EnrichmentScheduler:
    """Runs one background enrichment per new user, `concurrency` at a time, and stores the outcome."""

    enricher: PersonEnricher
    users: UserRepository
    concurrency: int = 4
    shutdown_grace: float = 5.0
    clock: Callable[[], datetime] = utc_now
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _closing: bool = field(default=False, init=False)
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(max(1, self.concurrency))

    @property
    def in_flight(self) -> int:
        """Enrichments scheduled and not finished (waiting for a slot included)."""
        return len(self._tasks)

    def schedule(self, user_id: uuid.UUID, email: str) -> None:
        """Enrich this user in the background; returns at once. Call it after the user is committed."""
        if self._closing:
            log.warning("person enrichment skipped: shutting down", extra={"user_id": str(user_id)})
            return
        if len(self._tasks) >= MAX_PENDING:
            log.warning("person enrichment skipped: too many pending", extra={"user_id": str(user_id)})
            return
        task = asyncio.create_task(self._enrich(user_id, email), name=f"enrichment:{user_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enrich(self, user_id: uuid.UUID, email: str) -> None:
        try:
            async with self._slots:
                result = await self.enricher.find(email)
                record = profile_record(result, self.enricher.source, self.clock())
                await self.users.set_profile(user_id, record)
            log.info("person enrichment stored", extra={"user_id": str(user_id), "status": result.status})
        except Exception:
            # A bug or the database: the user keeps a null profile; the signup is long answered.
            log.exception("person enrichment failed", extra={"user_id": str(user_id)})

    async def close(self) -> None:
        """Stop taking work; let enrichments in flight finish within the grace, cancel the rest."""
        self._closing = True
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pending:
            log.warning(
                "person enrichment: %d cancelled at shutdown after %.1f s", len(pending), self.shutdown_grace
            )
