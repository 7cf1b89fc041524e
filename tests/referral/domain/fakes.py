"""In-memory fakes of the referral ports (domain/ports.py), keeping the invariants the database keeps.

One `Store` holds the state the PostgreSQL adapters keep in tables; a unit of work's transaction
rolls the store back when its block raises. `FakeCodeCache` keeps entries as the Redis cache does:
writers overwrite, fills only fill gaps. `make_use_cases` wires them like app.py wires the adapters.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.referral.domain.models import (
    CONFIRMED,
    PENDING,
    Cursor,
    LevelCount,
    ListedReferral,
    Ranked,
    Referral,
    ReferralCode,
    Reservation,
)
from services.referral.domain.ports import (
    ABSENT,
    Absent,
    AlreadyLinked,
    CodeTextTaken,
    OpenCodeExists,
)
from services.referral.domain.rules import CodeRules
from services.referral.domain.use_cases import ReferralUseCases

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RULES = CodeRules(min_lifetime=timedelta(seconds=60), max_lifetime=timedelta(days=365))


@dataclass
class Clock:
    """The time the use cases and the fakes see; tests move it."""

    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Store:
    """What the tables hold: codes, links (by referral id), proven users; the locks each transaction took."""

    clock: Clock
    codes: list[ReferralCode] = field(default_factory=list)
    links: dict[uuid.UUID, Referral] = field(default_factory=dict)
    verified: set[uuid.UUID] = field(default_factory=set)
    # Uses taken for signups: referral id -> (code id, expiry).
    reservations: dict[uuid.UUID, tuple[uuid.UUID, datetime]] = field(default_factory=dict)
    locks: list[list[uuid.UUID]] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # repository reads, by method name
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    erased: set[uuid.UUID] = field(default_factory=set)
    commits: int = 0
    rollbacks: int = 0

    def active(self, code: ReferralCode) -> bool:
        return code.is_active(self.clock())

    def root_of(self, user_id: uuid.UUID) -> uuid.UUID:
        while user_id in self.links:
            user_id = self.links[user_id].referrer_id
        return user_id

    def link(
        self, referral_id: uuid.UUID, referrer_id: uuid.UUID, email: str, code: str, verified: bool
    ) -> Referral:
        if referral_id in self.links:
            raise AlreadyLinked
        status = CONFIRMED if verified or referral_id in self.verified else PENDING
        referral = Referral(referrer_id, referral_id, email, code, self.clock(), status)
        self.links[referral_id] = referral
        return referral

    def code_index(self, code_id: uuid.UUID) -> int:
        return next(i for i, c in enumerate(self.codes) if c.id == code_id)

    def count_use(self, code_id: uuid.UUID, change: int) -> ReferralCode | None:
        """The code with `change` more uses, unless that breaks its CHECK (0 <= uses <= max_uses)."""
        index = self.code_index(code_id)
        code = self.codes[index]
        uses = code.uses + change
        if uses < 0 or (code.max_uses is not None and uses > code.max_uses):
            return None
        self.codes[index] = replace(code, uses=uses)
        return self.codes[index]

    def reservation(self, referral_id: uuid.UUID) -> Reservation | None:
        if referral_id not in self.reservations:
            return None
        code_id, expires_at = self.reservations[referral_id]
        return Reservation(referral_id, self.codes[self.code_index(code_id)], expires_at)


class FakeCodeRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def active_of(self, owner_id: uuid.UUID) -> ReferralCode | None:
        self._store.reads.append("active_of")
        return next((c for c in self._store.codes if c.owner_id == owner_id and self._store.active(c)), None)

    async def active_by_email(self, email: str) -> ReferralCode | None:
        self._store.reads.append("active_by_email")
        found = [
            c for c in self._store.codes if c.owner_email.lower() == email.lower() and self._store.active(c)
        ]
        return max(found, key=lambda c: c.created_at, default=None)

    async def by_code(self, code: str) -> ReferralCode | None:
        self._store.reads.append("by_code")
        return next((c for c in self._store.codes if c.code.lower() == code.lower()), None)

    async def reserve(
        self, code_id: uuid.UUID, referral_id: uuid.UUID, expires_at: datetime
    ) -> Reservation | None:
        store = self._store
        if referral_id in store.reservations:
            return store.reservation(referral_id)
        if not store.active(store.codes[store.code_index(code_id)]):
            return None
        if store.count_use(code_id, +1) is None:
            return None
        store.reservations[referral_id] = (code_id, expires_at)
        return store.reservation(referral_id)

    async def reservation_of(self, referral_id: uuid.UUID) -> Reservation | None:
        return self._store.reservation(referral_id)

    async def release(self, referral_id: uuid.UUID, code: str) -> bool:
        store = self._store
        held = store.reservation(referral_id)
        if held is None or held.code.code.lower() != code.lower():
            return False
        del store.reservations[referral_id]
        store.count_use(held.code.id, -1)
        return True

    async def release_expired(self, now: datetime) -> int:
        store = self._store
        expired = [rid for rid, (_, expires_at) in store.reservations.items() if expires_at <= now]
        for referral_id in expired:
            code_id, _ = store.reservations.pop(referral_id)
            store.count_use(code_id, -1)
        return len(expired)


class FakeReferralRepository:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def root_of(self, user_id: uuid.UUID) -> uuid.UUID:
        return self._store.root_of(user_id)

    async def page(
        self, referrer_id: uuid.UUID, limit: int, after: Cursor | None
    ) -> tuple[int, int, list[ListedReferral]]:
        mine = sorted(
            (r for r in self._store.links.values() if r.referrer_id == referrer_id),
            key=lambda r: (r.created_at, r.referral_id),
            reverse=True,
        )
        total, confirmed = len(mine), sum(r.status == CONFIRMED for r in mine)
        if after is not None:
            mine = [r for r in mine if (r.created_at, r.referral_id) < (after.created_at, after.referral_id)]
        items = [ListedReferral(str(r.referral_id), r.referral_email, r.created_at, r.status) for r in mine]
        return total, confirmed, items[:limit]

    async def is_verified(self, user_id: uuid.UUID) -> bool:
        return user_id in self._store.verified


class FakeProgramRepository:
    """The program's counters, computed from the links (the database keeps them by triggers)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def stats(self, referrer_id: uuid.UUID, depth: int) -> tuple[list[LevelCount], ReferralCode | None]:
        counts: dict[int, list[int]] = {}
        for link in self._store.links.values():
            level, above = 1, link.referrer_id
            while level <= depth:
                if above == referrer_id:
                    entry = counts.setdefault(level, [0, 0])
                    entry[0] += 1
                    entry[1] += link.status == CONFIRMED
                    break
                if above not in self._store.links:
                    break
                above, level = self._store.links[above].referrer_id, level + 1
        active = [c for c in self._store.codes if c.owner_id == referrer_id and self._store.active(c)]
        code = active[0] if active else None
        return [LevelCount(level, *counts[level]) for level in sorted(counts)], code

    async def leaderboard(self, period: str, limit: int) -> list[Ranked]:
        # Every confirmed link counts, whatever the period: the periods are the database's to test.
        confirmed: dict[uuid.UUID, int] = {}
        for link in self._store.links.values():
            if link.status == CONFIRMED:
                confirmed[link.referrer_id] = confirmed.get(link.referrer_id, 0) + 1
        emails = {code.owner_id: code.owner_email for code in self._store.codes}
        ranked = sorted(confirmed.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return [Ranked(referrer, emails.get(referrer), count) for referrer, count in ranked]


class FakeEvents:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def publish(self, event_type: str, data: Mapping[str, Any]) -> None:
        self._store.events.append((event_type, dict(data)))


class FakeLinks:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.events = FakeEvents(store)

    async def open_code(
        self,
        owner_id: uuid.UUID,
        owner_email: str,
        code: str,
        expires_at: datetime,
        max_uses: int | None = None,
    ) -> ReferralCode:
        store, now = self._store, self._store.clock()
        # The owner's expired code is closed first (deleted_at = its expiry), in the same transaction.
        kept = [
            replace(c, deleted_at=c.expires_at)
            if c.owner_id == owner_id and c.deleted_at is None and c.expires_at <= now
            else c
            for c in store.codes
        ]
        if any(c.owner_id == owner_id and c.deleted_at is None for c in kept):
            raise OpenCodeExists
        if any(c.code.lower() == code.lower() for c in kept):
            raise CodeTextTaken
        created = ReferralCode(uuid.uuid4(), code, owner_id, owner_email, expires_at, now, None, max_uses)
        store.codes = [*kept, created]
        return created

    async def delete_active_code(self, owner_id: uuid.UUID) -> ReferralCode | None:
        store = self._store
        for index, code in enumerate(store.codes):
            if code.owner_id == owner_id and store.active(code):
                store.codes[index] = replace(code, deleted_at=store.clock())
                return store.codes[index]
        return None

    async def lock_trees(self, roots: Iterable[uuid.UUID]) -> None:
        self._store.locks.append(sorted(set(roots)))

    async def root_of(self, user_id: uuid.UUID) -> uuid.UUID:
        return self._store.root_of(user_id)

    async def referral_of(self, referral_id: uuid.UUID) -> Referral | None:
        return self._store.links.get(referral_id)

    async def add(
        self,
        referral_id: uuid.UUID,
        referrer_id: uuid.UUID,
        referral_email: str,
        code: str,
        *,
        email_verified: bool,
    ) -> Referral:
        return self._store.link(referral_id, referrer_id, referral_email, code, email_verified)

    async def add_by_active_code(
        self, referral_id: uuid.UUID, referral_email: str, code_id: uuid.UUID, *, email_verified: bool
    ) -> Referral | None:
        code = next((c for c in self._store.codes if c.id == code_id), None)
        if code is None or not self._store.active(code):
            return None
        return self._store.link(referral_id, code.owner_id, referral_email, code.code, email_verified)

    async def take_use(self, code_id: uuid.UUID) -> bool:
        return self._store.count_use(code_id, +1) is not None

    async def consume_reservation(self, referral_id: uuid.UUID) -> bool:
        return self._store.reservations.pop(referral_id, None) is not None

    async def was_erased(self, user_id: uuid.UUID) -> bool:
        return user_id in self._store.erased

    async def erase(
        self, user_id: uuid.UUID, replacement_id: uuid.UUID, tokens_expire_at: datetime
    ) -> tuple[list[ReferralCode], set[str]]:
        """As the repository does: codes deleted under the replacement without their address, every
        link re-keyed to the replacement (their own without their address), the subject recorded."""
        store, now = self._store, self._store.clock()
        emails = {c.owner_email for c in store.codes if c.owner_id == user_id}
        erased = [
            replace(
                c, owner_id=replacement_id, owner_email="", deleted_at=c.deleted_at or min(now, c.expires_at)
            )
            for c in store.codes
            if c.owner_id == user_id
        ]
        store.codes = [c for c in store.codes if c.owner_id != user_id] + erased
        links = {}
        for referral_id, link in store.links.items():
            kept = link
            if referral_id == user_id:
                emails.add(link.referral_email)
                kept = replace(kept, referral_id=replacement_id, referral_email="")
            if link.referrer_id == user_id:
                kept = replace(kept, referrer_id=replacement_id)
            links[kept.referral_id] = kept
        store.links = links
        store.verified.discard(user_id)
        store.reservations.pop(user_id, None)
        store.erased.add(user_id)
        emails.discard("")
        return erased, emails

    async def confirm_user(self, user_id: uuid.UUID) -> uuid.UUID | None:
        self._store.verified.add(user_id)
        link = self._store.links.get(user_id)
        if link is None or link.status != PENDING:
            return None
        self._store.links[user_id] = replace(link, status=CONFIRMED)
        return link.referrer_id


class FakeUnitOfWork:
    def __init__(self, store: Store) -> None:
        self._store = store

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[FakeLinks]:
        store = self._store
        saved = (
            list(store.codes),
            dict(store.links),
            set(store.verified),
            dict(store.reservations),
            list(store.events),
        )
        try:
            yield FakeLinks(store)
        except BaseException:
            store.codes, store.links, store.verified, store.reservations, store.events = saved
            store.rollbacks += 1
            raise
        store.commits += 1


class FakeCodeCache:
    """Entries by `code:<text>` and `email:<address>`, lowercased; `down`: answers nothing, keeps nothing."""

    def __init__(self) -> None:
        self.entries: dict[str, ReferralCode | Absent] = {}
        self.down = False

    async def by_code(self, text: str) -> ReferralCode | Absent | None:
        return None if self.down else self.entries.get(f"code:{text.lower()}")

    async def active_by_email(self, email: str) -> ReferralCode | Absent | None:
        return None if self.down else self.entries.get(f"email:{email.lower()}")

    def _fill(self, key: str, code: ReferralCode | None) -> None:
        if not self.down:
            self.entries.setdefault(key, ABSENT if code is None else code)

    async def fill_code(self, text: str, code: ReferralCode | None) -> None:
        self._fill(f"code:{text.lower()}", code)

    async def fill_email(self, email: str, code: ReferralCode | None) -> None:
        self._fill(f"email:{email.lower()}", code)

    async def code_created(self, code: ReferralCode) -> None:
        if not self.down:
            self.entries[f"code:{code.code.lower()}"] = code
            self.entries[f"email:{code.owner_email.lower()}"] = code

    async def code_deleted(self, code: ReferralCode) -> None:
        if not self.down:
            self.entries[f"code:{code.code.lower()}"] = code
            self.entries[f"email:{code.owner_email.lower()}"] = ABSENT


@dataclass
class World:
    """The use cases on fakes, and the fakes, for the test to set up and inspect."""

    clock: Clock
    store: Store
    cache: FakeCodeCache
    use_cases: ReferralUseCases


def make_world() -> World:
    clock = Clock()
    store = Store(clock)
    cache = FakeCodeCache()
    use_cases = ReferralUseCases(
        codes=FakeCodeRepository(store),
        referrals=FakeReferralRepository(store),
        uow=FakeUnitOfWork(store),
        cache=cache,
        rules=RULES,
        program=FakeProgramRepository(store),
        clock=clock,
    )
    return World(clock, store, cache, use_cases)
