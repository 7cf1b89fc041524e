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
# Events out (API.md "Events out: webhooks"), published with `tx.events.publish(type, data)`.
USER_CREATED = "user.created"  # {user_id, email_verified, referrer_id, created_at}
USER_EMAIL_VERIFIED = "user.email_verified"  # {user_id}
USER_DELETED = "user.deleted"  # {user_id}


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
    """The presented refresh token was live and is now rotated; `token_id` is the new token's parent,
    `login_at` when its login (the family) began."""

    token_id: uuid.UUID
    user_id: uuid.UUID
    family_id: uuid.UUID
    login_at: datetime | None = None


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


# --- sessions and the data export ------------------------------------------------------------------

# What a session keeps of its client: a User-Agent cut to this length, an address (an IP address as
# text; IPv6 with a zone fits) at most this long.
USER_AGENT_MAX = 256
ADDRESS_MAX = 64


def _printable(text: str | None, limit: int) -> str | None:
    """Only printable characters (no control characters, no lone surrogates), at most `limit`."""
    if text is None:
        return None
    kept = "".join(ch for ch in text if ch.isprintable())[:limit].strip()
    return kept or None


@dataclass(frozen=True, slots=True)
class Client:
    """Who signs in or refreshes: the User-Agent they sent and their address as the edge saw it.

    Built with `Client.of`, which makes any header storable: printable characters only, cut short.
    """

    user_agent: str | None = None
    address: str | None = None

    @classmethod
    def of(cls, user_agent: str | None, address: str | None) -> Client:
        return cls(_printable(user_agent, USER_AGENT_MAX), _printable(address, ADDRESS_MAX))


@dataclass(frozen=True, slots=True)
class LoginSession:
    """One live login (a refresh-token family): `id` is the family, the `sid` of its access tokens.

    `last_used_at` is the login or its latest refresh; `user_agent` and `address` are the client's at
    that moment. `current`: the session of the access token that asked.
    """

    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    user_agent: str | None
    address: str | None
    current: bool = False


@dataclass(frozen=True, slots=True)
class LinkedIdentity:
    """A provider identity linked to a user, as stored."""

    provider: str
    subject: str
    email: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ExportedCode:
    """One of the user's referral codes, whatever became of it: `status` is active, expired or deleted."""

    code: str
    status: str
    created_at: datetime
    expires_at: datetime
    deleted_at: datetime | None
    max_uses: int | None
    uses: int


@dataclass(frozen=True, slots=True)
class ExportedLink:
    """A referral link as the referral service keeps it; `email` is the referral's, unmasked."""

    referrer_id: uuid.UUID
    referral_id: uuid.UUID
    email: str | None
    code: str
    status: str
    created_at: datetime
    confirmed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ReferralRecords:
    """What the referral service holds about a user: their codes, their own link (who referred them),
    their referrals, and when it learnt their address was proven."""

    codes: list[ExportedCode]
    referrer: ExportedLink | None
    referrals: list[ExportedLink]
    email_verified_at: datetime | None


@dataclass(frozen=True, slots=True)
class DataExport:
    """Everything both services hold about a user (no secret: no password hash, no token digest)."""

    exported_at: datetime
    user: User
    has_password: bool
    identities: list[LinkedIdentity]
    sessions: list[LoginSession]
    referral: ReferralRecords


@dataclass(frozen=True, slots=True)
class Erasure:
    """An erased account's part to carry to the referral service: the user's id, and the random id
    their place in the referral trees takes (`email`: the erased address, only at the erasure)."""

    id: uuid.UUID
    user_id: uuid.UUID
    replacement_id: uuid.UUID
    email: str | None
