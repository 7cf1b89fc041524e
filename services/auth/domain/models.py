"""Domain objects the repositories return and the use cases hand to the API layer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

# The email verifier's statuses that refuse a signup; every other status is accepted.
UNDELIVERABLE_STATUSES = frozenset({"invalid", "disposable"})
UNCHECKED = "unchecked"
# What a mailed token proves (and the kind of mail that carries it).
VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"  # noqa: S105 (a purpose, not a password)


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    created_at: datetime
    referrer_id: uuid.UUID | None
    email_check: Any
    profile: Any
    email_verified: bool = False


@dataclass(frozen=True, slots=True)
class Credentials:
    """What login needs: the user and their password hash (None for provider-only accounts)."""

    user: User
    password_hash: str | None


@dataclass(frozen=True, slots=True)
class TokenPair:
    """The answer of signup and of both grants."""

    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "Bearer"  # noqa: S105 (the RFC 6750 scheme name)


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in user with fresh tokens."""

    user: User
    tokens: TokenPair


@dataclass(frozen=True, slots=True)
class ReferralCode:
    """An active referral code, as the referral service vouched for it."""

    code: str
    owner_id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ReferralLink:
    """'referral_id signed up with referrer_id's code': what the referral service is told."""

    referral_id: uuid.UUID
    referrer_id: uuid.UUID
    referral_email: str
    code: str


@dataclass(frozen=True, slots=True)
class EmailCheck:
    """An email verifier's verdict on an address, stored on the user as `email_check`.

    `status` is the verifier's (valid, invalid, accept_all, webmail, disposable, unknown) or
    `unchecked` when it could not say, with a short `reason` (timeout, rate_limited, ...).
    """

    status: str
    source: str
    checked_at: datetime
    score: int | None = None
    reason: str | None = None

    @property
    def undeliverable(self) -> bool:
        return self.status in UNDELIVERABLE_STATUSES

    @property
    def checked(self) -> bool:
        return self.status != UNCHECKED

    def as_record(self) -> dict[str, Any]:
        """The JSON stored on the user and in the cache: no key for what does not apply."""
        record: dict[str, Any] = {"status": self.status}
        if self.checked:
            record["score"] = self.score
        else:
            record["reason"] = self.reason
        record["source"] = self.source
        record["checked_at"] = self.checked_at.isoformat()
        return record

    @classmethod
    def from_record(cls, record: Any) -> EmailCheck:
        """Read back what `as_record` wrote; ValueError when it is not such a record."""
        try:
            score = record.get("score")
            return cls(
                status=str(record["status"]),
                source=str(record["source"]),
                checked_at=datetime.fromisoformat(str(record["checked_at"])),
                score=score if isinstance(score, int) and not isinstance(score, bool) else None,
                reason=record.get("reason"),
            )
        except (AttributeError, KeyError, TypeError) as error:
            raise ValueError(f"not an email check record: {type(error).__name__}") from None


@dataclass(frozen=True, slots=True)
class IssuedAccessToken:
    """A signed access token and how many seconds it lives."""

    token: str
    expires_in: int


@dataclass(frozen=True, slots=True)
class Rotated:
    """The presented refresh token was live and is now rotated; `token_id` is the new token's parent."""

    token_id: uuid.UUID
    user_id: uuid.UUID
    family_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ReusedToken:
    """The presented refresh token had already been rotated: its family must be revoked."""

    family_id: uuid.UUID


class Taken(Enum):
    """Why a mailed token could not be taken."""

    UNKNOWN = "unknown"  # never issued, already used, voided, or for another purpose
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class TokenOwner:
    """A mailed token taken: whose, and the address it was mailed to."""

    user_id: uuid.UUID
    email: str


@dataclass(frozen=True, slots=True)
class ProviderIdentity:
    """Who the provider says signed in: its stable subject and their email."""

    subject: str
    email: str
    email_verified: bool


@dataclass(frozen=True, slots=True)
class PendingFlow:
    """A sign-in just started: `state` and `code_challenge` and `nonce` go to the provider."""

    state: str
    code_verifier: str
    code_challenge: str
    nonce: str


@dataclass(frozen=True, slots=True)
class StoredFlow:
    """What the callback gets back for its state. The caller checks `provider` against the callback's."""

    provider: str
    code_verifier: str
    nonce: str
    referral_code: str | None


@dataclass(frozen=True, slots=True)
class Erasure:
    """An erased account's part to carry to the referral service: the user's id, and the random id
    their place in the referral trees takes (`email`: the erased address, only at the erasure)."""

    id: uuid.UUID
    user_id: uuid.UUID
    replacement_id: uuid.UUID
    email: str | None
