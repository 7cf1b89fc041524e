"""In-memory fakes of the auth domain's ports: the use cases run on them in milliseconds.

`FakeStore` is the "database": every repository reads and writes its `tables`. A transaction of
`FakeUnitOfWork` works on them directly and puts back a copy taken at its start when its block raises,
so a failed use case leaves nothing behind, as PostgreSQL would. `FakeStore.now` is the clock that
tokens expire by; `advance` moves it.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.auth.domain.errors import (
    EmailAlreadyUsed,
    ExhaustedCode,
    IdentityAlreadyLinked,
    ProviderError,
    ReferralServiceError,
    StateStoreUnavailable,
    UnknownCode,
)
from services.auth.domain.models import (
    RESET_PASSWORD,
    Client,
    Credentials,
    EmailCheck,
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
from services.auth.domain.oauth import OAuthService
from services.auth.domain.ownership import OwnershipMail
from services.auth.domain.use_cases import AuthService

# --- the "database" ----------------------------------------------------------------------------------


@dataclass
class UserRow:
    user: User
    password_hash: str | None


@dataclass
class RefreshRow:
    id: uuid.UUID
    user_id: uuid.UUID
    family_id: uuid.UUID
    parent_id: uuid.UUID | None
    expires_at: datetime
    rotated: bool = False
    revoked: bool = False
    created_at: datetime | None = None
    login_at: datetime | None = None
    client: Client | None = None


@dataclass
class MailTokenRow:
    user_id: uuid.UUID
    purpose: str
    email: str
    expires_at: datetime
    used: bool = False


@dataclass
class Mail:
    user_id: uuid.UUID
    recipient: str
    kind: str
    link: str

    @property
    def token(self) -> str:
        """The token the link carries in its fragment."""
        return self.link.partition("#token=")[2]


@dataclass
class Tables:
    users: dict[uuid.UUID, UserRow] = field(default_factory=dict)
    refresh_tokens: dict[bytes, RefreshRow] = field(default_factory=dict)
    identities: dict[tuple[str, str], uuid.UUID] = field(default_factory=dict)
    # (provider, subject) -> (email, linked at)
    identity_details: dict[tuple[str, str], tuple[str, datetime]] = field(default_factory=dict)
    mail_tokens: dict[bytes, MailTokenRow] = field(default_factory=dict)
    referral_outbox: list[ReferralLink] = field(default_factory=list)
    verified_outbox: list[uuid.UUID] = field(default_factory=list)
    mail_outbox: list[Mail] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class FakeStore:
    tables: Tables = field(default_factory=Tables)
    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    commits: int = 0
    rollbacks: int = 0
    # Identities another request links between a use case's look-up and its insert (a race it loses).
    linked_meanwhile: set[tuple[str, str]] = field(default_factory=set)

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class FakeUsers:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    @property
    def _rows(self) -> dict[uuid.UUID, UserRow]:
        return self._store.tables.users

    def _by_email(self, email: str) -> UserRow | None:
        return next((r for r in self._rows.values() if r.user.email.lower() == email.lower()), None)

    def _replace(self, user_id: uuid.UUID, **changes: Any) -> User | None:
        row = self._rows.get(user_id)
        if row is None:
            return None
        fields = {name: getattr(row.user, name) for name in User.__slots__}  # type: ignore[attr-defined]
        password_hash = changes.pop("password_hash", row.password_hash)
        row.user = User(**{**fields, **changes})
        row.password_hash = password_hash
        return row.user

    async def email_exists(self, email: str) -> bool:
        return self._by_email(email) is not None

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
        if self._by_email(email) is not None:
            raise EmailAlreadyUsed(email)
        user = User(
            id=user_id or uuid.uuid4(),
            email=email,
            created_at=self._store.now,
            referrer_id=referrer_id,
            email_check=dict(email_check) if email_check is not None else None,
            profile=None,
            email_verified=email_verified,
        )
        self._rows[user.id] = UserRow(user, password_hash)
        return user

    async def get(self, user_id: uuid.UUID) -> User | None:
        row = self._rows.get(user_id)
        return row.user if row else None

    async def credentials(self, email: str) -> Credentials | None:
        row = self._by_email(email)
        return Credentials(row.user, row.password_hash) if row else None

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        self._replace(user_id, password_hash=password_hash)

    async def mark_verified(self, user_id: uuid.UUID) -> User | None:
        return self._replace(user_id, email_verified=True)

    async def take_over(self, user_id: uuid.UUID) -> User | None:
        return self._replace(user_id, password_hash=None, email_verified=True)

    async def set_profile(self, user_id: uuid.UUID, profile: Mapping[str, Any]) -> bool:
        return self._replace(user_id, profile=dict(profile)) is not None


class FakeRefreshTokens:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    @property
    def _rows(self) -> dict[bytes, RefreshRow]:
        return self._store.tables.refresh_tokens

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
        assert token_hash not in self._rows
        now = self._store.now
        self._rows[token_hash] = RefreshRow(
            uuid.uuid4(),
            user_id,
            family_id,
            parent_id,
            now + ttl,
            created_at=now,
            login_at=login_at or now,
            client=client,
        )

    async def rotate(self, token_hash: bytes) -> Rotated | ReusedToken | None:
        row = self._rows.get(token_hash)
        if row is None:
            return None
        if not row.rotated and not row.revoked and row.expires_at > self._store.now:
            row.rotated = True
            return Rotated(row.id, row.user_id, row.family_id, row.login_at)
        return ReusedToken(row.family_id) if row.rotated else None

    async def family_of(self, token_hash: bytes) -> uuid.UUID | None:
        row = self._rows.get(token_hash)
        return row.family_id if row else None

    def _revoke(self, rows: list[RefreshRow]) -> int:
        live = [row for row in rows if not row.revoked]
        for row in live:
            row.revoked = True
        return len(live)

    async def revoke_all(self, user_id: uuid.UUID, *, keep: uuid.UUID | None = None) -> int:
        return self._revoke([r for r in self._rows.values() if r.user_id == user_id and r.family_id != keep])

    async def revoke_family(self, family_id: uuid.UUID) -> int:
        return self._revoke([r for r in self._rows.values() if r.family_id == family_id])

    def _live(self) -> list[RefreshRow]:
        return [
            r
            for r in self._rows.values()
            if not r.revoked and not r.rotated and r.expires_at > self._store.now
        ]

    async def live_sessions(self, user_id: uuid.UUID) -> list[LoginSession]:
        live = sorted(
            (r for r in self._live() if r.user_id == user_id), key=lambda r: r.created_at, reverse=True
        )
        return [
            LoginSession(
                r.family_id,
                r.login_at or self._store.now,
                r.created_at or self._store.now,
                r.client.user_agent if r.client else None,
                r.client.address if r.client else None,
            )
            for r in live
        ]

    async def revoke_session(self, user_id: uuid.UUID, family_id: uuid.UUID) -> bool:
        if not any(r.user_id == user_id and r.family_id == family_id for r in self._live()):
            return False
        self._revoke([r for r in self._rows.values() if r.family_id == family_id])
        return True

    def live_families(self, user_id: uuid.UUID) -> set[uuid.UUID]:
        """Families of the user with a token that still works (test helper)."""
        return {
            r.family_id
            for r in self._rows.values()
            if r.user_id == user_id and not r.revoked and not r.rotated and r.expires_at > self._store.now
        }


class FakeIdentities:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    @property
    def _rows(self) -> dict[tuple[str, str], uuid.UUID]:
        return self._store.tables.identities

    async def user_for(self, provider: str, subject: str) -> uuid.UUID | None:
        return self._rows.get((provider, subject))

    async def add(self, provider: str, subject: str, user_id: uuid.UUID, email: str) -> None:
        if (provider, subject) in self._rows or (provider, subject) in self._store.linked_meanwhile:
            raise IdentityAlreadyLinked(provider, subject)
        self._rows[(provider, subject)] = user_id
        self._store.tables.identity_details[(provider, subject)] = (email, self._store.now)

    async def of_user(self, user_id: uuid.UUID) -> list[LinkedIdentity]:
        details = self._store.tables.identity_details
        return [
            LinkedIdentity(provider, subject, *details[(provider, subject)])
            for (provider, subject), owner in self._rows.items()
            if owner == user_id
        ]

    async def remove_all(self, user_id: uuid.UUID) -> int:
        mine = [key for key, owner in self._rows.items() if owner == user_id]
        for key in mine:
            del self._rows[key]
        return len(mine)


class FakeMailTokens:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    @property
    def _rows(self) -> dict[bytes, MailTokenRow]:
        return self._store.tables.mail_tokens

    async def add(
        self, *, token_hash: bytes, user_id: uuid.UUID, purpose: str, email: str, ttl: timedelta
    ) -> None:
        self._rows[token_hash] = MailTokenRow(user_id, purpose, email, self._store.now + ttl)

    def _look(self, token_hash: bytes, purpose: str) -> MailTokenRow | Taken:
        row = self._rows.get(token_hash)
        if row is None or row.used or row.purpose != purpose:
            return Taken.UNKNOWN
        return row if row.expires_at > self._store.now else Taken.EXPIRED

    async def take(self, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        row = self._look(token_hash, purpose)
        if isinstance(row, Taken):
            return row
        row.used = True
        return TokenOwner(row.user_id, row.email)

    async def peek(self, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        row = self._look(token_hash, purpose)
        return row if isinstance(row, Taken) else TokenOwner(row.user_id, row.email)

    async def void(self, user_id: uuid.UUID, purpose: str) -> None:
        for row in self._rows.values():
            if row.user_id == user_id and row.purpose == purpose:
                row.used = True

    async def request_reset(self, *, email: str, token_hash: bytes, ttl: timedelta, link: str) -> bool:
        owner = next(
            (
                r.user
                for r in self._store.tables.users.values()
                if r.user.email.lower() == email.strip().lower()
            ),
            None,
        )
        if owner is None:
            return False
        await self.void(owner.id, RESET_PASSWORD)
        await self.add(
            token_hash=token_hash, user_id=owner.id, purpose=RESET_PASSWORD, email=owner.email, ttl=ttl
        )
        self._store.tables.mail_outbox.append(Mail(owner.id, owner.email, RESET_PASSWORD, link))
        return True


class FakeReferralOutbox:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    async def add(self, link: ReferralLink) -> None:
        self._store.tables.referral_outbox.append(link)


class FakeVerifiedOutbox:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    async def add(self, user_id: uuid.UUID) -> bool:
        if user_id in self._store.tables.verified_outbox:  # once per user
            return False
        self._store.tables.verified_outbox.append(user_id)
        return True


class FakeMailOutbox:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    async def add(self, *, user_id: uuid.UUID, recipient: str, kind: str, link: str) -> None:
        self._store.tables.mail_outbox.append(Mail(user_id, recipient, kind, link))


class FakeEvents:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    async def publish(self, event_type: str, data: Mapping[str, Any]) -> None:
        self._store.tables.events.append((event_type, dict(data)))


class FakeTransaction:
    def __init__(self, store: FakeStore) -> None:
        self.users = FakeUsers(store)
        self.refresh_tokens = FakeRefreshTokens(store)
        self.identities = FakeIdentities(store)
        self.mail_tokens = FakeMailTokens(store)
        self.referral_outbox = FakeReferralOutbox(store)
        self.verified_outbox = FakeVerifiedOutbox(store)
        self.mail_outbox = FakeMailOutbox(store)
        self.events = FakeEvents(store)


class FakeUnitOfWork:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        before = copy.deepcopy(self._store.tables)
        try:
            yield FakeTransaction(self._store)
        except BaseException:
            self._store.tables = before
            self._store.rollbacks += 1
            raise
        self._store.commits += 1


# --- CPU and keys ------------------------------------------------------------------------------------


class FakeHasher:
    """`hashed:<password>`; a hash starting `old:` is of outdated parameters (needs a rehash)."""

    def __init__(self) -> None:
        self.verified: list[str] = []
        self.dummy_checks = 0
        self.fail_with: Exception | None = None

    async def hash(self, password: str) -> str:
        return f"hashed:{password}"

    async def verify(self, password_hash: str, password: str) -> bool:
        if self.fail_with is not None:
            raise self.fail_with
        self.verified.append(password_hash)
        return password_hash.partition(":")[2] == password

    async def verify_dummy(self, password: str) -> None:
        self.dummy_checks += 1

    def needs_rehash(self, password_hash: str) -> bool:
        return password_hash.startswith("old:")


class FakeIssuer:
    def __init__(self) -> None:
        self.issued: list[dict[str, Any]] = []

    def issue(
        self,
        subject: uuid.UUID | str,
        *,
        email: str | None,
        email_verified: bool | None = None,
        session_id: uuid.UUID | None = None,
    ) -> IssuedAccessToken:
        claims = {"sub": str(subject), "email": email, "email_verified": email_verified, "sid": session_id}
        self.issued.append(claims)
        return IssuedAccessToken(f"access-{len(self.issued)}", 900)


# --- Redis -------------------------------------------------------------------------------------------


class FakeThrottle:
    """The rules of the login throttle: per (account, address) and per address, reserved up front."""

    def __init__(self, *, per_pair: int = 5, per_address: int = 50, retry_after: int = 900) -> None:
        self.per_pair, self.per_address, self.retry_after = per_pair, per_address, retry_after
        self.pairs: dict[tuple[str, str], int] = {}
        self.addresses: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def _account(account: str) -> str:
        return account.strip().lower()

    async def reserve(self, account: str, address: str) -> int | None:
        self.calls.append(("reserve", address))
        pair = (self._account(account), address)
        if self.pairs.get(pair, 0) >= self.per_pair or self.addresses.get(address, 0) >= self.per_address:
            return self.retry_after
        self.pairs[pair] = self.pairs.get(pair, 0) + 1
        self.addresses[address] = self.addresses.get(address, 0) + 1
        return None

    async def succeeded(self, account: str, address: str) -> None:
        self.calls.append(("succeeded", address))
        self.pairs.pop((self._account(account), address), None)
        self.addresses[address] = max(0, self.addresses.get(address, 0) - 1)

    async def undecided(self, account: str, address: str) -> None:
        self.calls.append(("undecided", address))
        pair = (self._account(account), address)
        self.pairs[pair] = max(0, self.pairs.get(pair, 0) - 1)
        self.addresses[address] = max(0, self.addresses.get(address, 0) - 1)

    async def clear(self, account: str) -> None:
        self.calls.append(("clear", self._account(account)))
        for pair in [p for p in self.pairs if p[0] == self._account(account)]:
            del self.pairs[pair]


class FakeMailLimiter:
    def __init__(self, *, per_address: int = 100, retry_after: int = 60) -> None:
        self.per_address, self.retry_after = per_address, retry_after
        self.counts: dict[tuple[str, str], int] = {}

    async def reserve(self, kind: str, email: str) -> int | None:
        key = (kind, email.strip().lower())
        if self.counts.get(key, 0) >= self.per_address:
            return self.retry_after
        self.counts[key] = self.counts.get(key, 0) + 1
        return None


class FakeStateStore:
    def __init__(self) -> None:
        self.flows: dict[str, StoredFlow] = {}
        self.down = False

    async def create(self, provider: str, *, referral_code: str | None) -> PendingFlow:
        if self.down:
            raise StateStoreUnavailable("down")
        state = f"state-{len(self.flows)}-{uuid.uuid4().hex}"
        self.flows[state] = StoredFlow(provider, f"verifier-{state}", f"nonce-{state}", referral_code)
        return PendingFlow(state, f"verifier-{state}", f"challenge-{state}", f"nonce-{state}")

    async def consume(self, state: str) -> StoredFlow | None:
        if self.down:
            raise StateStoreUnavailable("down")
        return self.flows.pop(state, None)


# --- other services ----------------------------------------------------------------------------------


class FakeReferralCodes:
    """Codes the referral service vouches for, with their `max_uses` and the uses reserved for signups
    (`reserved`: user id -> code); `failures` maps a code to the exception it raises."""

    def __init__(self) -> None:
        self.codes: dict[str, ReferralCode] = {}
        self.max_uses: dict[str, int] = {}
        self.reserved: dict[uuid.UUID, str] = {}
        self.released: list[tuple[str, uuid.UUID]] = []
        self.failures: dict[str, Exception] = {}
        self.release_failure: Exception | None = None
        self.asked: list[str] = []

    def add(self, code: str, owner_id: uuid.UUID, *, max_uses: int | None = None) -> ReferralCode:
        self.codes[code] = ReferralCode(code, owner_id, datetime(2030, 1, 1, tzinfo=UTC))
        if max_uses is not None:
            self.max_uses[code] = max_uses
        return self.codes[code]

    def uses(self, code: str) -> int:
        return sum(taken == code for taken in self.reserved.values())

    async def reserve_code(self, code: str, referral_id: uuid.UUID) -> ReferralCode:
        self.asked.append(code)
        if code in self.failures:
            raise self.failures[code]
        if code not in self.codes:
            raise UnknownCode()
        if referral_id not in self.reserved:
            if code in self.max_uses and self.uses(code) >= self.max_uses[code]:
                raise ExhaustedCode()
            self.reserved[referral_id] = code
        return self.codes[code]

    async def release_code(self, code: str, referral_id: uuid.UUID) -> None:
        self.released.append((code, referral_id))
        if self.release_failure is not None:
            raise self.release_failure
        if self.reserved.get(referral_id) == code:
            del self.reserved[referral_id]


class FakeReferralExports:
    """The referral service's records of users; `down` makes it fail as an unreachable service."""

    def __init__(self) -> None:
        self.records: dict[uuid.UUID, ReferralRecords] = {}
        self.down = False

    async def export_user(self, user_id: uuid.UUID) -> ReferralRecords:
        if self.down:
            raise ReferralServiceError("user export: ClientConnectorError")
        return self.records.get(user_id, ReferralRecords([], None, [], None))


class FakeDelivery:
    def __init__(self) -> None:
        self.delivered: list[ReferralLink] = []

    async def deliver_now(self, link: ReferralLink) -> None:
        self.delivered.append(link)


class FakeWaker:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class FakeEnrichment:
    def __init__(self) -> None:
        self.scheduled: list[tuple[uuid.UUID, str]] = []

    def schedule(self, user_id: uuid.UUID, email: str) -> None:
        self.scheduled.append((user_id, email))


class FakeEmailVerifier:
    def __init__(self) -> None:
        self.statuses: dict[str, str] = {}
        self.asked: list[str] = []

    async def verify(self, email: str) -> EmailCheck:
        self.asked.append(email)
        status = self.statuses.get(email, "valid")
        return EmailCheck(status=status, source="fake", checked_at=datetime(2026, 1, 1, tzinfo=UTC), score=90)


class FakeProvider:
    """A sign-in provider that answers the identity set for each code (or fails)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.identities: dict[str, ProviderIdentity] = {}

    @property
    def name(self) -> str:
        return self._name

    async def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, nonce: str
    ) -> str:
        return f"https://{self._name}.example/authorize?state={state}&code_challenge={code_challenge}"

    async def exchange(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        if code not in self.identities:
            raise ProviderError("token endpoint: HTTP 400 invalid_grant")
        return self.identities[code]


# --- the use cases, wired to the fakes ---------------------------------------------------------------


@dataclass
class World:
    """The auth use cases on fakes, and the fakes, to arrange and to look at."""

    store: FakeStore = field(default_factory=FakeStore)
    hasher: FakeHasher = field(default_factory=FakeHasher)
    issuer: FakeIssuer = field(default_factory=FakeIssuer)
    throttle: FakeThrottle = field(default_factory=FakeThrottle)
    mail_limiter: FakeMailLimiter = field(default_factory=FakeMailLimiter)
    referrals: FakeReferralCodes = field(default_factory=FakeReferralCodes)
    exports: FakeReferralExports = field(default_factory=FakeReferralExports)
    delivery: FakeDelivery = field(default_factory=FakeDelivery)
    relay: FakeWaker = field(default_factory=FakeWaker)
    enrichment: FakeEnrichment = field(default_factory=FakeEnrichment)
    verifier: FakeEmailVerifier = field(default_factory=FakeEmailVerifier)
    states: FakeStateStore = field(default_factory=FakeStateStore)
    provider: FakeProvider = field(default_factory=lambda: FakeProvider("acme"))

    def __post_init__(self) -> None:
        self.users = FakeUsers(self.store)
        self.refresh_tokens = FakeRefreshTokens(self.store)
        self.identities = FakeIdentities(self.store)
        self.auth = AuthService(
            uow=FakeUnitOfWork(self.store),
            users=self.users,
            refresh_tokens=self.refresh_tokens,
            identities=self.identities,
            hasher=self.hasher,
            issuer=self.issuer,
            throttle=self.throttle,
            refresh_ttl=timedelta(days=30),
            referrals=self.referrals,
            referral_exports=self.exports,
            referral_delivery=self.delivery,
            ownership=OwnershipMail(
                app_url="https://app.example/",
                verification_ttl=timedelta(hours=24),
                reset_ttl=timedelta(minutes=30),
                relays=[self.relay],
            ),
            mail_limiter=self.mail_limiter,
            email_verifier=self.verifier,
            enrichment=self.enrichment,
        )
        self.oauth = OAuthService(
            auth=self.auth,
            providers={self.provider.name: self.provider},
            states=self.states,
            redirect_uri=lambda name: f"https://api.example/oauth/{name}/callback",
        )

    @property
    def tables(self) -> Tables:
        return self.store.tables

    def mails(self, kind: str, recipient: str | None = None) -> list[Mail]:
        return [
            m
            for m in self.tables.mail_outbox
            if m.kind == kind and (recipient is None or m.recipient == recipient)
        ]

    def password_hash(self, user_id: uuid.UUID) -> str | None:
        return self.tables.users[user_id].password_hash
