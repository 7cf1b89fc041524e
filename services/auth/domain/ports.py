"""The ports the use cases need, as Protocols: what they ask of storage, Redis, HTTP services, the
signer and the hasher. The adapters implement them; the tests' fakes do too.

Repositories return domain objects. Writes that must commit together go through a unit of work:
`async with uow.transaction() as tx:` gives repositories bound to one transaction (`tx.users`, ...),
committed when the block ends and rolled back when it raises. Outside a transaction, the use cases
read and write through the repositories they were given, each call its own statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

from services.auth.domain.models import (
    Client,
    Credentials,
    EmailCheck,
    Erasure,
    IssuedAccessToken,
    LinkedIdentity,
    LoginSession,
    PendingFlow,
    ProviderIdentity,
    ReferralCode,
    ReferralLink,
    ReferralRecords,
    ReusedToken,
    Rotated,
    StoredFlow,
    Taken,
    TokenOwner,
    User,
)

# --- storage ---------------------------------------------------------------------------------------


class UserRepository(Protocol):
    """Users by id and by email (compared case-insensitively)."""

    async def email_exists(self, email: str) -> bool: ...

    async def add(
        self,
        email: str,
        password_hash: str | None,
        referrer_id: uuid.UUID | None = None,
        *,
        email_check: Mapping[str, Any] | None = None,
        email_verified: bool = False,
        user_id: uuid.UUID | None = None,
    ) -> User:
        """EmailAlreadyUsed when an account has the address. `user_id`: the id to give the user
        (one is generated when None)."""
        ...

    async def get(self, user_id: uuid.UUID) -> User | None: ...

    async def credentials(self, email: str) -> Credentials | None: ...

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None: ...

    async def mark_verified(self, user_id: uuid.UUID) -> User | None:
        """The address is proven; the user as it now is (None when gone)."""
        ...

    async def take_over(self, user_id: uuid.UUID) -> User | None:
        """Drop the password and mark the address proven; the user as it now is (None when gone)."""
        ...

    async def set_profile(self, user_id: uuid.UUID, profile: Mapping[str, Any]) -> bool: ...


class RefreshTokenRepository(Protocol):
    """Refresh tokens, stored only as digests, grouped in families (one login each)."""

    async def add(
        self,
        *,
        token_hash: bytes,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        parent_id: uuid.UUID | None,
        ttl: timedelta,
        client: Client | None = None,
        login_at: datetime | None = None,
    ) -> None:
        """A new token of the family, made for `client`; `login_at` None: a login's first token."""
        ...

    async def rotate(self, token_hash: bytes) -> Rotated | ReusedToken | None:
        """Mark a live token rotated; say so when it was rotated before; None when unknown or dead."""
        ...

    async def family_of(self, token_hash: bytes) -> uuid.UUID | None: ...

    async def revoke_all(self, user_id: uuid.UUID, *, keep: uuid.UUID | None = None) -> int:
        """Revoke every live token of the user but those of the family `keep`; how many."""
        ...

    async def revoke_family(self, family_id: uuid.UUID) -> int: ...

    async def live_sessions(self, user_id: uuid.UUID) -> list[LoginSession]:
        """The user's live logins (families with a live token), the most recently used first."""
        ...

    async def revoke_session(self, user_id: uuid.UUID, family_id: uuid.UUID) -> bool:
        """Revoke the user's live login `family_id`, also a token a refresh is making for it right now;
        False when it is not a live login of this user. Call it in a transaction."""
        ...


class IdentityRepository(Protocol):
    """(provider, subject) -> user id; a subject names at most one user."""

    async def user_for(self, provider: str, subject: str) -> uuid.UUID | None: ...

    async def add(self, provider: str, subject: str, user_id: uuid.UUID, email: str) -> None:
        """IdentityAlreadyLinked when the subject is linked already."""
        ...

    async def remove_all(self, user_id: uuid.UUID) -> int: ...

    async def of_user(self, user_id: uuid.UUID) -> list[LinkedIdentity]:
        """The user's identities, oldest first."""
        ...


class MailTokenRepository(Protocol):
    """Single-use mailed tokens, stored only as digests: issued, taken once, voided."""

    async def add(
        self, *, token_hash: bytes, user_id: uuid.UUID, purpose: str, email: str, ttl: timedelta
    ) -> None: ...

    async def take(self, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        """Use the token now (it never works again), or say why it cannot be used."""
        ...

    async def peek(self, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        """What `take` would answer now, without using the token."""
        ...

    async def void(self, user_id: uuid.UUID, purpose: str) -> None: ...

    async def request_reset(self, *, email: str, token_hash: bytes, ttl: timedelta, link: str) -> bool:
        """A reset token and its mail when an account has `email` (its older reset tokens die); whether.
        The same work whether or not an account has it."""
        ...


class ReferralOutbox(Protocol):
    """Referral links to deliver to the referral service, written in the signup's transaction."""

    async def add(self, link: ReferralLink) -> None: ...


class VerifiedOutbox(Protocol):
    """Users whose address became proven, to tell the referral service (once per user)."""

    async def add(self, user_id: uuid.UUID) -> bool:
        """Whether this is the first time for the user (False: told already)."""
        ...


class MailOutbox(Protocol):
    """Mails to send, written in the transaction that made the token their link carries."""

    async def add(self, *, user_id: uuid.UUID, recipient: str, kind: str, link: str) -> None: ...


class EventPublisher(Protocol):
    """Events out (API.md "Events out: webhooks"), written in the transaction of the change they report:
    `await tx.events.publish(USER_DELETED, {"user_id": user_id})`. Nothing is written when no webhook
    endpoint is configured."""

    async def publish(self, event_type: str, data: Mapping[str, Any]) -> None:
        """`data` is the event's JSON object (UUIDs and datetimes allowed); see the event types in models."""


class ErasureRepository(Protocol):
    """Account erasure, in the caller's transaction."""

    async def erase(
        self, user_id: uuid.UUID, replacement_id: uuid.UUID, tokens_expire_at: datetime
    ) -> Erasure | None:
        """Remove the user and everything personal of theirs; queue the referral service's part
        (re-keying the person to `replacement_id`), claimed by the caller; record the subject as denied
        until `tokens_expire_at`. None when the user is gone already."""
        ...


class Transaction(Protocol):
    """Repositories bound to one database transaction."""

    @property
    def users(self) -> UserRepository: ...
    @property
    def refresh_tokens(self) -> RefreshTokenRepository: ...
    @property
    def identities(self) -> IdentityRepository: ...
    @property
    def mail_tokens(self) -> MailTokenRepository: ...
    @property
    def referral_outbox(self) -> ReferralOutbox: ...
    @property
    def verified_outbox(self) -> VerifiedOutbox: ...
    @property
    def mail_outbox(self) -> MailOutbox: ...
    @property
    def events(self) -> EventPublisher: ...
    @property
    def erasures(self) -> ErasureRepository: ...


class UnitOfWork(Protocol):
    """Opens transactions: committed when the block ends, rolled back when it raises."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...


# --- after the commit ------------------------------------------------------------------------------


class ReferralLinkDelivery(Protocol):
    """Delivers a link the signup just committed to its outbox, at once (the relay retries the rest)."""

    async def deliver_now(self, link: ReferralLink) -> None:
        """Never raises: a failed attempt is left to the relay."""
        ...


class ErasureDelivery(Protocol):
    """Carries an erasure the caller just committed to the referral service, at once (the relay
    retries it until the referral service has done its part)."""

    async def deliver_now(self, erasure: Erasure) -> None:
        """Never raises: a failed attempt is left to the relay."""
        ...


class DenyList(Protocol):
    """Subjects whose access tokens every process of both services refuses (shared/denylist.py)."""

    async def deny(self, subject: uuid.UUID, expires_at: datetime) -> bool:
        """Refuse the subject's tokens everywhere before returning; False when only the database
        holds the entry (Redis could not be written)."""
        ...


class OutboxWaker(Protocol):
    """Has the relays look at their outboxes now (after a commit that wrote to them)."""

    def wake(self) -> None: ...


class EnrichmentScheduler(Protocol):
    """Enriches a user's profile in the background; returns at once."""

    def schedule(self, user_id: uuid.UUID, email: str) -> None: ...


# --- Redis -----------------------------------------------------------------------------------------


class LoginThrottle(Protocol):
    """Failed logins per (account, client address) and per client address, reserved before the check."""

    async def reserve(self, account: str, address: str) -> int | None:
        """Count this attempt, or refuse it: None when it may go on, else seconds until it may."""
        ...

    async def succeeded(self, account: str, address: str) -> None: ...

    async def undecided(self, account: str, address: str) -> None: ...

    async def clear(self, account: str) -> None:
        """Forget the account's failures at every address."""
        ...


class MailLimiter(Protocol):
    """Mails of one kind to one address, counted whether or not an account has the address."""

    async def reserve(self, kind: str, email: str) -> int | None:
        """Count one: None when it may be sent, else seconds until one may."""
        ...


class OAuthStateStore(Protocol):
    """Pending provider sign-ins under a random state, each good for one callback."""

    async def create(self, provider: str, *, referral_code: str | None) -> PendingFlow:
        """StateStoreUnavailable when it cannot be stored."""
        ...

    async def consume(self, state: str) -> StoredFlow | None:
        """The flow, deleted as it is read; None when unknown, used or expired; StateStoreUnavailable."""
        ...


# --- other services ------------------------------------------------------------------------------


class ReferralCodes(Protocol):
    """The referral service's codes, as a signup uses them."""

    async def reserve_code(self, code: str, referral_id: uuid.UUID) -> ReferralCode:
        """Take one use of the active code for the user about to be created with this id (idempotent
        by that id); the code. UnknownCode, InactiveCode, ExhaustedCode, or ReferralServiceError."""
        ...

    async def release_code(self, code: str, referral_id: uuid.UUID) -> None:
        """Give back the use reserved for this user, whose signup failed (idempotent);
        ReferralServiceError."""
        ...


class ReferralExports(Protocol):
    """The referral service's records of a user, for the data export."""

    async def export_user(self, user_id: uuid.UUID) -> ReferralRecords:
        """Everything it holds about the user; ReferralServiceError when it cannot answer."""
        ...


class EmailVerifier(Protocol):
    """Judges an address; it never raises, it answers `unchecked` instead."""

    async def verify(self, email: str) -> EmailCheck: ...


class IdentityProvider(Protocol):
    """One configured sign-in provider (`name` is the one in the callback path)."""

    @property
    def name(self) -> str: ...

    async def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, nonce: str
    ) -> str:
        """Where to send the browser: the provider's authorization endpoint with PKCE S256 (and nonce)."""
        ...

    async def exchange(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        """Trade the callback's code for the signed-in identity; ProviderError for every failure."""
        ...


# --- CPU and keys ----------------------------------------------------------------------------------


class PasswordHasher(Protocol):
    """argon2id off the event loop; `verify_dummy` costs what a real check costs (unknown users)."""

    async def hash(self, password: str) -> str: ...

    async def verify(self, password_hash: str, password: str) -> bool: ...

    async def verify_dummy(self, password: str) -> None: ...

    def needs_rehash(self, password_hash: str) -> bool: ...


class AccessTokenIssuer(Protocol):
    """Signs a user's access token."""

    def issue(
        self,
        subject: uuid.UUID | str,
        *,
        email: str | None,
        email_verified: bool | None = None,
        session_id: uuid.UUID | None = None,
    ) -> IssuedAccessToken: ...
