"""The ports the referral use cases need, as Protocols: the adapters implement them, tests fake them.

What a repository raises when the database refuses a write is part of its contract, so those
exceptions live here too; the use cases map them to domain errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from services.referral.domain.models import (
    Cursor,
    LevelCount,
    ListedReferral,
    Ranked,
    Referral,
    ReferralCode,
    Reservation,
    UserRecords,
)


class OpenCodeExists(Exception):
    """The owner already has an open code (the partial unique index said so)."""


class CodeTextTaken(Exception):
    """Another code (of anyone, ever) has this text, compared case-insensitively."""


class AlreadyLinked(Exception):
    """The user is already somebody's referral (the primary key said so)."""


class Absent:
    """The cache's answer when the database said: no such code (or no active code for this email)."""


ABSENT = Absent()


class CodeRepository(Protocol):
    """Referral codes, read (and their uses reserved) outside a unit of work; they are opened and
    deleted in one (`Links.open_code`, `Links.delete_active_code`)."""

    async def active_of(self, owner_id: uuid.UUID) -> ReferralCode | None: ...

    async def active_by_email(self, email: str) -> ReferralCode | None:
        """The active code of the owner of this email, compared case-insensitively."""
        ...

    async def by_code(self, code: str) -> ReferralCode | None:
        """The code with this text (any state), compared case-insensitively."""
        ...

    async def reserve(
        self, code_id: uuid.UUID, referral_id: uuid.UUID, expires_at: datetime
    ) -> Reservation | None:
        """Take one use of the code for the referral's signup, in one step that checks, under the
        code's lock, that it is active and has a use left (None when not); the referral's reservation
        as it already was (nothing taken) when it has one."""
        ...

    async def reservation_of(self, referral_id: uuid.UUID) -> Reservation | None: ...

    async def release(self, referral_id: uuid.UUID, code: str) -> bool:
        """Give back the use the referral's unconsumed reservation of this code took; True when there
        was one."""
        ...

    async def release_expired(self, now: datetime) -> int:
        """Give back the uses of every reservation expired at `now`; how many."""
        ...


class ReferralRepository(Protocol):
    """Who referred whom, read outside a unit of work."""

    async def root_of(self, user_id: uuid.UUID) -> uuid.UUID:
        """The top of the user's referrer chain (the user when nobody referred them)."""
        ...

    async def page(
        self, referrer_id: uuid.UUID, limit: int, after: Cursor | None
    ) -> tuple[int, int, list[ListedReferral]]:
        """The referrer's total and confirmed count, and up to `limit` referrals, newest first,
        strictly after the cursor, all as of one moment."""
        ...

    async def is_verified(self, user_id: uuid.UUID) -> bool:
        """Whether the auth service told us the user's address is proven."""
        ...

    async def records_of(self, user_id: uuid.UUID) -> UserRecords:
        """Everything held about the user (codes of every state, oldest first; their link; their
        referrals, oldest first; their proof), as of one moment."""
        ...


class ProgramRepository(Protocol):
    """The referral program's counters (kept as links change, never a walk of the links)."""

    async def stats(self, referrer_id: uuid.UUID, depth: int) -> tuple[list[LevelCount], ReferralCode | None]:
        """The referrer's counts at levels 1 to `depth` (levels without referrals left out) and their
        active code, as of one moment."""
        ...

    async def leaderboard(self, period: str, limit: int) -> list[Ranked]:
        """The first `limit` referrers of the current `period` (PERIODS), by confirmed links in it,
        then the earlier first confirmation in it, then the referrer id."""
        ...


class EventPublisher(Protocol):
    """Events out (API.md "Events out: webhooks"), written in the transaction of the change they report;
    nothing is written when no webhook endpoint is configured."""

    async def publish(self, event_type: str, data: Mapping[str, Any]) -> None:
        """`data` is the event's JSON object (UUIDs and datetimes allowed)."""
        ...


class Links(Protocol):
    """The writes of one transaction of a unit of work: who referred whom, the codes opened and
    deleted, and the events these changes publish (`events`)."""

    @property
    def events(self) -> EventPublisher: ...

    async def open_code(
        self,
        owner_id: uuid.UUID,
        owner_email: str,
        code: str,
        expires_at: datetime,
        max_uses: int | None = None,
    ) -> ReferralCode:
        """Open a code (closing the owner's expired one first); OpenCodeExists or CodeTextTaken (the
        transaction is then unusable: let the exception end it)."""
        ...

    async def delete_active_code(self, owner_id: uuid.UUID) -> ReferralCode | None:
        """Delete the owner's active code; the deleted code, or None when there was none."""
        ...

    async def lock_trees(self, roots: Iterable[uuid.UUID]) -> None:
        """Locks, held until the transaction ends, on the trees rooted at `roots`, always taken in
        the same order."""
        ...

    async def root_of(self, user_id: uuid.UUID) -> uuid.UUID: ...

    async def referral_of(self, referral_id: uuid.UUID) -> Referral | None: ...

    async def add(
        self,
        referral_id: uuid.UUID,
        referrer_id: uuid.UUID,
        referral_email: str,
        code: str,
        *,
        email_verified: bool,
    ) -> Referral:
        """Link the user to the referrer; AlreadyLinked. Confirmed when `email_verified` or the user
        is recorded as proven when the statement runs, else pending."""
        ...

    async def add_by_active_code(
        self, referral_id: uuid.UUID, referral_email: str, code_id: uuid.UUID, *, email_verified: bool
    ) -> Referral | None:
        """Link the user to the code's owner if the code is still active when the write runs (None if
        not); AlreadyLinked. The status as in `add`."""
        ...

    async def take_use(self, code_id: uuid.UUID) -> bool:
        """Count one more use of the code if it has one left (False when not), holding the code's row
        lock until the transaction ends: racers for the last use are served one at a time."""
        ...

    async def consume_reservation(self, referral_id: uuid.UUID) -> bool:
        """Remove the referral's reservation, its use now the link's; False when there was none."""
        ...

    async def was_erased(self, user_id: uuid.UUID) -> bool:
        """Whether the user was erased here."""
        ...

    async def erase(
        self, user_id: uuid.UUID, replacement_id: uuid.UUID, tokens_expire_at: datetime
    ) -> tuple[list[ReferralCode], set[str]]:
        """Remove the person, re-keying their place in the trees to `replacement_id`; record the subject
        as erased. The codes as they are now (deleted, anonymous) and the addresses the person had."""
        ...

    async def confirm_user(self, user_id: uuid.UUID) -> uuid.UUID | None:
        """Record that the user's address is proven and confirm their pending link, if any; the
        referrer of the link confirmed now (None when none was)."""
        ...


class UnitOfWork(Protocol):
    """Transactions: `async with uow.begin() as links:` commits when the block ends, rolls back when
    it raises."""

    def begin(self) -> AbstractAsyncContextManager[Links]: ...


class CodeCache(Protocol):
    """Cached answers of `CodeRepository.by_code` and `.active_by_email`; never raises on its own
    trouble (it answers None: not cached)."""

    async def by_code(self, text: str) -> ReferralCode | Absent | None:
        """The cached code (any state), ABSENT when the database had none, None when not cached."""
        ...

    async def active_by_email(self, email: str) -> ReferralCode | Absent | None:
        """The cached code of this email's owner (it may have expired since), ABSENT when the database
        had none, None when not cached."""
        ...

    async def fill_code(self, text: str, code: ReferralCode | None) -> None:
        """What the database answered for this text, kept unless something is cached already."""
        ...

    async def fill_email(self, email: str, code: ReferralCode | None) -> None:
        """What the database answered for this email, kept unless something is cached already."""
        ...

    async def code_created(self, code: ReferralCode) -> None:
        """A new code: overwrites what is cached for its text and its owner's email."""
        ...

    async def user_erased(self, codes: Iterable[ReferralCode], emails: Iterable[str]) -> None:
        """An erased user's codes (now deleted and anonymous) and their addresses: no entry of theirs
        may be served again."""
        ...

    async def code_deleted(self, code: ReferralCode) -> None:
        """A deleted code: its text keeps the deleted code, its owner's email has none."""
        ...


class DenyList(Protocol):
    """Subjects whose access tokens every process refuses (shared/denylist.py)."""

    async def deny(self, subject: uuid.UUID, expires_at: datetime) -> bool: ...
