"""Domain objects the repositories return and the use cases hand to the API layer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

# A link's status: pending until the referral's address is proven, then confirmed (never back).
PENDING = "pending"
CONFIRMED = "confirmed"
STATUSES = (PENDING, CONFIRMED)
# What became of a code, as the data export says it.
ACTIVE = "active"
EXPIRED = "expired"
DELETED = "deleted"
CODE_STATES = (ACTIVE, EXPIRED, DELETED)

# Events out (API.md "Events out: webhooks"), published in the transaction of the change.
CODE_CREATED = "code.created"  # {code, owner_id, expires_at, max_uses}
CODE_DELETED = "code.deleted"  # {code, owner_id, expires_at, max_uses}
REFERRAL_CREATED = "referral.created"  # {referrer_id, referral_id, status, created_at}
REFERRAL_CONFIRMED = "referral.confirmed"  # {referrer_id, referral_id}


@dataclass(frozen=True, slots=True)
class ReferralCode:
    id: uuid.UUID
    code: str
    owner_id: uuid.UUID
    owner_email: str
    expires_at: datetime
    created_at: datetime
    deleted_at: datetime | None
    max_uses: int | None = None  # None: no limit
    uses: int = 0  # links made with the code, and uses reserved for signups not linked yet

    def is_active(self, now: datetime) -> bool:
        """Usable: not deleted and not yet expired."""
        return self.deleted_at is None and self.expires_at > now

    def state(self, now: datetime) -> str:
        """ACTIVE, EXPIRED (an expired code closed when its owner made the next one: `deleted_at` is its
        expiry), or DELETED (by its owner, before it expired)."""
        if self.deleted_at is not None and self.deleted_at < self.expires_at:
            return DELETED
        return ACTIVE if self.is_active(now) else EXPIRED


@dataclass(frozen=True, slots=True)
class Reservation:
    """A use of a code taken for a signup before its user exists; the signup's link consumes it."""

    referral_id: uuid.UUID
    code: ReferralCode
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Referral:
    referrer_id: uuid.UUID
    referral_id: uuid.UUID
    referral_email: str
    code: str
    created_at: datetime
    status: str  # PENDING or CONFIRMED
    confirmed_at: datetime | None = None  # when it became confirmed (read where it is shown)


@dataclass(frozen=True, slots=True)
class UserRecords:
    """Everything this service holds about a user, for their data export: every code they ever had
    (deleted and expired ones too), their own link (who referred them), their referrals (emails
    unmasked: they are the referrer), and when the auth service said their address was proven."""

    user_id: uuid.UUID
    codes: list[ReferralCode]
    referrer: Referral | None
    referrals: list[Referral]
    email_verified_at: datetime | None


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """One of a user's codes in their export, with what became of it (CODE_STATES)."""

    code: ReferralCode
    state: str


@dataclass(frozen=True, slots=True)
class UserExport:
    """The export's answer: the user's records, each code with its state as of `as_of`."""

    user_id: uuid.UUID
    as_of: datetime
    codes: list[CodeRecord]
    referrer: Referral | None
    referrals: list[Referral]
    email_verified_at: datetime | None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of a referrer's referrals (newest first) resumes."""

    created_at: datetime
    referral_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ListedReferral:
    """One entry of a referrer's list: what the page shows (the id as text, as it is shown)."""

    referral_id: str
    email: str
    joined_at: datetime
    status: str  # PENDING or CONFIRMED


@dataclass(frozen=True, slots=True)
class ReferralPage:
    referrer_id: uuid.UUID
    total: int
    confirmed: int
    items: list[ListedReferral]
    next_cursor: Cursor | None
    emails_visible: bool  # the viewer is the referrer; others see the emails masked


# --- the referral program: statistics by level and the leaderboard -------------------------------

# Leaderboard periods, in UTC: the current ISO week (from Monday 00:00), the current calendar month,
# and all time.
WEEK = "week"
MONTH = "month"
ALL_TIME = "all"
PERIODS = (WEEK, MONTH, ALL_TIME)
# The deepest level the database counts (migration 0006); REFERRAL_STATS_DEPTH is at most this.
MAX_STATS_DEPTH = 5


@dataclass(frozen=True, slots=True)
class LevelCount:
    """A referrer's referrals at one level (1: direct, 2: theirs, ...), and the confirmed ones."""

    level: int
    total: int
    confirmed: int


@dataclass(frozen=True, slots=True)
class ReferrerStats:
    referrer_id: uuid.UUID
    levels: list[LevelCount]  # every level from 1 to the configured depth, zeros included
    code: ReferralCode | None  # the referrer's active code

    @property
    def total(self) -> int:
        return sum(level.total for level in self.levels)

    @property
    def confirmed(self) -> int:
        return sum(level.confirmed for level in self.levels)

    @property
    def pending(self) -> int:
        return self.total - self.confirmed


@dataclass(frozen=True, slots=True)
class Ranked:
    """A referrer's place in a period, as the store ranks them; `email` None when unknown here."""

    referrer_id: uuid.UUID
    email: str | None
    confirmed: int


@dataclass(frozen=True, slots=True)
class LeaderboardEntry:
    rank: int
    referrer_id: uuid.UUID
    email: str | None  # masked
    confirmed: int


@dataclass(frozen=True, slots=True)
class Leaderboard:
    period: str
    items: list[LeaderboardEntry]
