"""Delivery of the referral outbox: at once after a signup commits, then by a relay with backoff.

A signup with a code writes its link to `auth.referral_outbox` in the signup's transaction, already
claimed (leased) by that signup, which then tries to deliver it once. Whatever that attempt does,
the relay, a background task in every replica, claims due links (`claim_due`: SKIP LOCKED plus a
lease, so replicas never deliver the same link at the same moment), delivers them concurrently,
and marks each delivered (200/201), failed for good (409/422, logged as an error) or due again
after an exponential backoff with jitter (anything else). The referral service records a link
idempotently by referral id, so a delivery repeated after a lost answer does no harm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter

from services.auth.db.repositories import ReferralOutboxRepository
from services.auth.domain.models import PendingLink
from services.auth.referrals import LinkRefused, ReferralClient, ReferralServiceError
from shared.db import DatabaseUnavailable

log = logging.getLogger(__name__)

BATCH_SIZE = 32
# How long a claimed link stays out of other replicas' reach beyond the call's own timeout.
LEASE_MARGIN = 10.0


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: `base` doubling per attempt up to `maximum`, then 50-100% of it."""

    base: float = 0.5
    maximum: float = 60.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        ceiling = min(self.maximum, self.base * 2.0 ** min(max(attempts - 1, 0), 40))
        # Jitter spreads the retries of links that failed together (one outage) over time.
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (not a secret)


class ReferralOutboxRelay:
    """Delivers pending referral links; `deliver_now` after a signup, `start`/`stop` the background loop."""

    def __init__(
        self,
        outbox: ReferralOutboxRepository,
        client: ReferralClient,
        *,
        backoff: Backoff,
        poll_interval: float,
        call_timeout: float,
        registry: CollectorRegistry,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._outbox = outbox
        self._client = client
        self._backoff = backoff
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self.lease = timedelta(seconds=call_timeout + LEASE_MARGIN)
        self._stop_wait = call_timeout + LEASE_MARGIN / 2
        self._wake = asyncio.Event()
        self._next_due = float("inf")
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._deliveries = Counter(
            "auth_referral_deliveries",
            "Attempts to deliver a referral link to the referral service, by outcome",
            ["outcome"],
            registry=registry,
        )

    async def deliver_now(self, pending: PendingLink) -> None:
        """The signup's own attempt, on the link it wrote claimed; failures are only logged."""
        try:
            await self._deliver(pending)
        except Exception:
            # The link is in the outbox: the relay delivers it once the lease ends.
            log.exception("referral link: immediate delivery failed", extra=_ids(pending))

    def wake(self, due_in: float = 0.0) -> None:
        """Have the relay look again in `due_in` seconds (at once by default)."""
        self._next_due = min(self._next_due, time.monotonic() + due_in)
        self._wake.set()  # the waiting relay recomputes how long to sleep

    async def _deliver(self, pending: PendingLink) -> None:
        referral_id = pending.link.referral_id
        try:
            created = await self._client.record_referral(pending.link)
        except LinkRefused as refused:
            self._deliveries.labels("refused").inc()
            log.error(  # noqa: TRY400 (the refusal is an answer, not a crash: no traceback)
                "referral link refused for good by the referral service; not retried",
                extra={**_ids(pending), "status": refused.status, "code": refused.code},
            )
            await self._outbox.mark_failed(referral_id, str(refused))
        except ReferralServiceError as error:
            self._deliveries.labels("retry").inc()
            delay = self._backoff.delay(pending.attempts)
            log.warning(
                "referral link not delivered; retrying later",
                extra={**_ids(pending), "error": str(error), "attempts": pending.attempts, "delay": delay},
            )
            await self._outbox.retry_later(referral_id, timedelta(seconds=delay), str(error))
            self.wake(delay)
        else:
            self._deliveries.labels("delivered" if created else "already_recorded").inc()
            await self._outbox.mark_delivered(referral_id)
            log.info("referral link delivered", extra={**_ids(pending), "newly_recorded": created})

    async def run_once(self) -> int:
        """Claim the due links and deliver them concurrently; return how many were claimed."""
        claimed = await self._outbox.claim_due(limit=self._batch_size, lease=self.lease)
        if claimed:
            results = await asyncio.gather(*(self._deliver(p) for p in claimed), return_exceptions=True)
            for pending, result in zip(claimed, results, strict=True):
                if isinstance(result, Exception):
                    log.error("referral link: delivery bookkeeping failed (%r)", result, extra=_ids(pending))
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
                log.warning("referral outbox: database unavailable (%s)", error)
                claimed = 0
            except Exception:
                log.exception("referral outbox: relay pass failed")
                claimed = 0
            if claimed < self._batch_size:  # a full batch means more may be due: go on at once
                await self._wait()

    def start(self) -> None:
        """Start the background loop (once per process)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="referral-outbox-relay")

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
            # Claimed links that were cut short are picked up again when their lease ends.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.warning("referral outbox relay cancelled after %.1f s at shutdown", self._stop_wait)


def _ids(pending: PendingLink) -> dict[str, str]:
    return {"referral_id": str(pending.link.referral_id), "referrer_id": str(pending.link.referrer_id)}
