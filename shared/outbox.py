"""The relay of a transactional outbox: what a change must send later is written in the change's own
transaction, and delivered at least once by this relay, whatever crashes or outages come between.

Every replica runs a relay per outbox. It claims due rows (`claim_due`: the store uses SKIP LOCKED plus
a lease, so replicas never deliver the same row at the same moment), delivers them concurrently, and
marks each delivered, failed for good (`PermanentFailure`, logged as an error), or due again after an
exponential backoff with jitter (`TemporaryFailure`, anything else that goes wrong). A row older than
`give_up_after` is failed for good at its next failure. `deliver_now` sends a row the caller has just
written and claimed (the same bookkeeping); `wake` has the relay look at once.

A delivery may happen twice (a crash between the send and its bookkeeping): receivers must be
idempotent, or the duplicate harmless (a second copy of a mail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter

from shared.db import DatabaseUnavailable

log = logging.getLogger(__name__)

BATCH_SIZE = 32
# How long a claimed row stays out of other replicas' reach beyond the delivery's own timeout.
LEASE_MARGIN = 10.0

T = TypeVar("T")


class PermanentFailure(Exception):
    """The receiver refused the row for good: never tried again. The message is stored: no secrets."""


class TemporaryFailure(Exception):
    """The delivery may succeed later (unreachable, timeout, 5xx). The message is stored: no secrets."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: `base` doubling per attempt up to `maximum`, then 50-100% of it."""

    base: float = 0.5
    maximum: float = 60.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        ceiling = min(self.maximum, self.base * 2.0 ** min(max(attempts - 1, 0), 40))
        # Jitter spreads the retries of rows that failed together (one outage) over time.
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (not a secret)


@dataclass(frozen=True)
class Claimed(Generic[T]):
    """A row claimed for one attempt: what to deliver, its key, its attempts (this one counted), its age."""

    item: T
    key: Any
    attempts: int
    created_at: datetime | None = None


class OutboxStore(Protocol[T]):
    """An outbox table: rows are claimed for an attempt, then marked by the relay."""

    async def claim_due(self, *, limit: int, lease: timedelta) -> list[Claimed[T]]: ...
    async def mark_delivered(self, key: Any) -> None: ...
    async def mark_failed(self, key: Any, error: str) -> None: ...
    async def retry_later(self, key: Any, delay: timedelta, error: str) -> None: ...


class OutboxRelay(Generic[T]):
    """Delivers one outbox's rows with `deliver`, which returns an outcome label for the metrics or
    raises PermanentFailure / TemporaryFailure."""

    def __init__(
        self,
        name: str,
        store: OutboxStore[T],
        deliver: Callable[[T], Awaitable[str]],
        *,
        backoff: Backoff,
        poll_interval: float,
        call_timeout: float,
        registry: CollectorRegistry,
        metric: str,
        describe: Callable[[T], Mapping[str, str]] = lambda _: {},
        give_up_after: timedelta | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.name = name
        self._store = store
        self._deliver_item = deliver
        self._describe = describe
        self._backoff = backoff
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._give_up_after = give_up_after
        self.lease = timedelta(seconds=call_timeout + LEASE_MARGIN)
        self._stop_wait = call_timeout + LEASE_MARGIN / 2
        self._wake = asyncio.Event()
        self._next_due = float("inf")
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._outcomes = Counter(
            metric, f"Attempts to deliver the {name} outbox, by outcome", ["outcome"], registry=registry
        )

    async def deliver_now(self, claimed: Claimed[T]) -> None:
        """The writer's own attempt, on a row it wrote claimed; failures are only logged."""
        try:
            await self._deliver(claimed)
        except Exception:
            # The row is in the outbox: the relay delivers it once the lease ends.
            log.exception("%s: immediate delivery failed", self.name, extra=self._describe(claimed.item))

    def wake(self, due_in: float = 0.0) -> None:
        """Have the relay look again in `due_in` seconds (at once by default)."""
        self._next_due = min(self._next_due, time.monotonic() + due_in)
        self._wake.set()  # the waiting relay recomputes how long to sleep

    def _too_old(self, claimed: Claimed[T]) -> bool:
        if self._give_up_after is None or claimed.created_at is None:
            return False
        return datetime.now(claimed.created_at.tzinfo) - claimed.created_at > self._give_up_after

    async def _deliver(self, claimed: Claimed[T]) -> None:
        ids = self._describe(claimed.item)
        try:
            outcome = await self._deliver_item(claimed.item)
        except PermanentFailure as refused:
            self._outcomes.labels("refused").inc()
            log.error(  # noqa: TRY400 (a refusal is an answer, not a crash: no traceback)
                "%s: refused for good; not retried", self.name, extra={**ids, "error": str(refused)}
            )
            await self._store.mark_failed(claimed.key, str(refused))
            return
        except Exception as error:
            reason = str(error) if isinstance(error, TemporaryFailure) else type(error).__name__
            if self._too_old(claimed):
                self._outcomes.labels("gave_up").inc()
                log.error(  # noqa: TRY400 (an outcome, not a crash)
                    "%s: not delivered after %s; given up",
                    self.name,
                    self._give_up_after,
                    extra={**ids, "error": reason, "attempts": claimed.attempts},
                )
                await self._store.mark_failed(claimed.key, f"gave up: {reason}")
                return
            self._outcomes.labels("retry").inc()
            delay = self._backoff.delay(claimed.attempts)
            log.warning(
                "%s: not delivered; retrying later",
                self.name,
                extra={**ids, "error": reason, "attempts": claimed.attempts, "delay": delay},
            )
            await self._store.retry_later(claimed.key, timedelta(seconds=delay), reason)
            self.wake(delay)
            return
        self._outcomes.labels(outcome).inc()
        await self._store.mark_delivered(claimed.key)
        log.info("%s: delivered", self.name, extra={**ids, "outcome": outcome})

    async def run_once(self) -> int:
        """Claim the due rows and deliver them concurrently; return how many were claimed."""
        claimed = await self._store.claim_due(limit=self._batch_size, lease=self.lease)
        if claimed:
            results = await asyncio.gather(*(self._deliver(c) for c in claimed), return_exceptions=True)
            for row, result in zip(claimed, results, strict=True):
                if isinstance(result, Exception):
                    log.error(
                        "%s: delivery bookkeeping failed (%r)",
                        self.name,
                        result,
                        extra=self._describe(row.item),
                    )
        return len(claimed)

    async def _wait(self) -> None:
        """Sleep until the poll interval ends, a hinted due time comes, or a wake-up says now."""
        deadline = time.monotonic() + self._poll_interval
        while not self._stopping:
            remaining = min(deadline, self._next_due) - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                break
        self._next_due = float("inf")

    async def _run(self) -> None:
        while not self._stopping:
            try:
                claimed = await self.run_once()
            except DatabaseUnavailable as error:
                log.warning("%s: database unavailable (%s)", self.name, error)
                claimed = 0
            except Exception:
                log.exception("%s: relay pass failed", self.name)
                claimed = 0
            if claimed < self._batch_size:  # a full batch means more may be due: go on at once
                await self._wait()

    def start(self) -> None:
        """Start the background loop (once per process)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-relay")

    async def stop(self) -> None:
        """Let a delivery in progress finish (bounded by the call timeout), then stop the loop."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self._stop_wait)
        except TimeoutError:
            # Claimed rows that were cut short are picked up again when their lease ends.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.warning("%s relay cancelled after %.1f s at shutdown", self.name, self._stop_wait)
