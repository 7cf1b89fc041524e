"""Domain objects the repositories return and the use cases hand to the API layer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    created_at: datetime
    referrer_id: uuid.UUID | None
    email_check: Any
    profile: Any


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
class PendingLink:
    """A link in the outbox, claimed for one delivery attempt (`attempts` counts this one)."""

    link: ReferralLink
    attempts: int
