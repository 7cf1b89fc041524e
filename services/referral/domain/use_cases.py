"""Use cases of the referral service: codes, their lookup, links between referrers and referrals.

They reach storage only through the ports (domain/ports.py) they are given.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.referral.domain.codes import generate_code
from services.referral.domain.errors import (
    ActiveCodeExists,
    AlreadyReferred,
    CodeExhausted,
    CodeExpired,
    CodeNotFound,
    CodeTaken,
    EmailUnverified,
    Forbidden,
    ReferralCycle,
    SelfReferral,
    UserErased,
)
from services.referral.domain.models import (
    CODE_CREATED,
    CODE_DELETED,
    REFERRAL_CONFIRMED,
    REFERRAL_CREATED,
    CodeRecord,
    Cursor,
    Leaderboard,
    LeaderboardEntry,
    LevelCount,
    Referral,
    ReferralCode,
    ReferralPage,
    ReferrerStats,
    Reservation,
    UserExport,
)
from services.referral.domain.ports import (
    ABSENT,
    AlreadyLinked,
    CodeCache,
    CodeRepository,
    CodeTextTaken,
    DenyList,
    OpenCodeExists,
    ProgramRepository,
    ReferralRepository,
    UnitOfWork,
)
from services.referral.domain.rules import CodeRules, mask_email
from shared.emails import same_mailbox
from shared.problems import ServiceUnavailable

log = logging.getLogger(__name__)

GENERATION_ATTEMPTS = 5
LINK_ATTEMPTS = 5
# How long a use reserved for a signup waits for the signup's link. The auth service delivers the link
# right after its commit, else its outbox retries; only a signup that never committed (a crash between
# the reservation and the commit, a release that was lost) leaves a reservation to expire. A reservation
# swept before a late link arrives would make that link take a use again, refused if none is left, so
# this is generous: a day, the horizon the system gives its other deliveries.
RESERVATION_TTL = timedelta(hours=24)


def utc_now() -> datetime:
    return datetime.now(UTC)


def code_event(code: ReferralCode) -> dict[str, Any]:
    """The data of `code.created` and `code.deleted`."""
    return {
        "code": code.code,
        "owner_id": code.owner_id,
        "expires_at": code.expires_at,
        "max_uses": code.max_uses,
    }


@dataclass(frozen=True)
class Linked:
    """A link and whether this call made it (False: it was already there, the same)."""

    referral: Referral
    created: bool


@dataclass
class ReferralUseCases:
    """The referral use cases, with their collaborators."""

    codes: CodeRepository
    referrals: ReferralRepository
    uow: UnitOfWork
    cache: CodeCache
    rules: CodeRules
    program: ProgramRepository
    clock: Callable[[], datetime] = utc_now
    new_code: Callable[[], str] = generate_code
    stats_depth: int = 3  # levels the statistics show (REFERRAL_STATS_DEPTH)
    deny_for: timedelta = timedelta(seconds=1020)  # an erased user's tokens refused (REFERRAL_DENY_LIST_TTL)
    deny_list: DenyList | None = None

    # --- codes -----------------------------------------------------------------------------------

    async def create_code(
        self,
        owner_id: uuid.UUID,
        owner_email: str,
        expires_at: datetime,
        vanity: str | None,
        *,
        email_verified: bool,
        max_uses: int | None = None,
    ) -> ReferralCode:
        """Open the owner's code: their vanity text or a generated one.

        Only for a proven owner: their token says so (`email_verified`), or the auth service's notice
        did; EmailUnverified before anything else is checked or written otherwise.
        """
        if not email_verified and not await self.referrals.is_verified(owner_id):
            raise EmailUnverified("Verify your email address before you create a referral code.")
        self.rules.check_expiry(expires_at, self.clock())
        attempts = 1 if vanity else GENERATION_ATTEMPTS
        for _ in range(attempts):
            try:
                async with self.uow.begin() as tx:
                    code = await tx.open_code(
                        owner_id, owner_email, vanity or self.new_code(), expires_at, max_uses
                    )
                    await tx.events.publish(CODE_CREATED, code_event(code))
            except OpenCodeExists:
                raise ActiveCodeExists("Delete your active code first, or wait until it expires.") from None
            except CodeTextTaken:
                if vanity:
                    raise CodeTaken() from None
                continue  # a generated code collided (about 1 in 10^16): draw another
            await self.cache.code_created(code)
            return code
        raise ServiceUnavailable("Could not generate a free code; try again.")

    async def my_code(self, owner_id: uuid.UUID) -> ReferralCode:
        code = await self.codes.active_of(owner_id)
        if code is None:
            raise CodeNotFound("You have no active referral code.")
        return code

    async def delete_my_code(self, owner_id: uuid.UUID) -> None:
        async with self.uow.begin() as tx:
            code = await tx.delete_active_code(owner_id)
            if code is not None:
                await tx.events.publish(CODE_DELETED, code_event(code))
        if code is None:
            raise CodeNotFound("You have no active referral code.")
        await self.cache.code_deleted(code)

    async def code_by_email(self, email: str) -> ReferralCode:
        """The active code of the user with this email; the same 404 for unknown emails and no code."""
        cached = await self.cache.active_by_email(email)
        if cached is ABSENT:
            raise CodeNotFound()
        if isinstance(cached, ReferralCode):
            if not cached.is_active(self.clock()):  # expired since it was cached
                raise CodeNotFound()
            return cached
        code = await self.codes.active_by_email(email)
        await self.cache.fill_email(email, code)
        if code is None:
            raise CodeNotFound()
        return code

    async def usable_code(self, text: str) -> ReferralCode:
        """The code with this text if it can be used now; CodeNotFound or CodeExpired otherwise."""
        cached = await self.cache.by_code(text)
        if cached is ABSENT:
            raise CodeNotFound()
        code = cached if isinstance(cached, ReferralCode) else await self.codes.by_code(text)
        if cached is None:
            await self.cache.fill_code(text, code)
        if code is None:
            raise CodeNotFound()
        if not code.is_active(self.clock()):
            raise CodeExpired()
        return code

    async def reserve_use(self, text: str, referral_id: uuid.UUID) -> Reservation:
        """The auth service's check of a code before it creates a signup's user, whose id it chose:
        one use of the code is taken for that user now, so the signup's link, whenever it arrives, is
        never refused for want of a use (it consumes the reservation), and a signup that would exceed
        `max_uses` is refused before its user exists (CodeExhausted).

        Idempotent by referral id: the reservation the user already has is answered again, and nothing
        more is taken. A signup and an activation racing for the last use are decided by whichever
        statement takes the code's row lock first; the other finds no use left.
        """
        existing = await self.codes.reservation_of(referral_id)
        if existing is not None:
            return existing
        code = await self.usable_code(text)
        if code.owner_id == referral_id:
            raise SelfReferral()
        reserved = await self.codes.reserve(code.id, referral_id, self.clock() + RESERVATION_TTL)
        if reserved is not None:
            return reserved
        now = await self.codes.by_code(text)
        if now is None or not now.is_active(self.clock()):
            raise CodeExpired()
        raise CodeExhausted()

    async def release_use(self, text: str, referral_id: uuid.UUID) -> None:
        """The auth service's signup failed after its reservation: the use goes back. Idempotent; a
        reservation its link consumed already is not there to release."""
        if await self.codes.release(referral_id, text):
            log.info("code use released", extra={"referral_id": str(referral_id)})

    async def release_expired_reservations(self) -> int:
        """The sweep: uses reserved for signups that never delivered their link go back."""
        released = await self.codes.release_expired(self.clock())
        if released:
            log.warning("expired code reservations released", extra={"released": released})
        return released

    # --- links -----------------------------------------------------------------------------------

    async def activate(self, user_id: uuid.UUID, email: str, text: str, *, email_verified: bool) -> Referral:
        """The caller becomes the referral of the code's owner; the link is confirmed when the caller's
        token says their address is proven (`email_verified`) or the auth service's notice did."""
        code = await self.usable_code(text)
        # The owner's own address under another spelling (case, Gmail dots, a +tag) is the owner too.
        if code.owner_id == user_id or same_mailbox(code.owner_email, email):
            raise SelfReferral()
        linked = await self._link(
            user_id, code.owner_id, email, code.code, code_id=code.id, email_verified=email_verified
        )
        if not linked.created:
            raise AlreadyReferred()
        return linked.referral

    async def record_signup_link(
        self, referral_id: uuid.UUID, referrer_id: uuid.UUID, email: str, code: str
    ) -> Linked:
        """The auth service's link for a signup with a code, checked when the signup was accepted.

        Idempotent by referral id: the same link again answers as before. It carries no proof of the
        address: pending, unless the auth service's notice for the user arrived first.

        A signup with a code took a use of it when it was accepted (`reserve_use`): the link consumes
        that reservation. Without one (it expired, or the signup predates the limits), the link takes a
        use as an activation would, and is refused with CodeExhausted when none is left. A link refused
        for good gives its reservation's use back.
        """
        if referral_id == referrer_id:
            await self.codes.release(referral_id, code)
            raise SelfReferral()
        try:
            return await self._link(referral_id, referrer_id, email, code, code_id=None, email_verified=False)
        except (AlreadyReferred, ReferralCycle):
            await self.codes.release(referral_id, code)
            raise

    async def confirm_user(self, user_id: uuid.UUID) -> None:
        """The auth service's notice: the user's address is proven. Their pending link, now or when it
        is made, is confirmed. Idempotent.

        The user's own lock comes first, the lock a link for this user takes before it writes (the
        user is then the root of their own tree): the notice and the link are serialized, and the one
        that goes second sees what the first committed. The lock of the root of the user's tree is
        taken too: the confirmation moves the program's counters of every ancestor (migration 0006),
        and a link that gives the tree new ancestors holds that lock while it copies the tree's
        counts to them; without it, one of the two would miss the other's change.
        """
        for _ in range(LINK_ATTEMPTS):
            root_seen = await self.referrals.root_of(user_id)
            async with self.uow.begin() as links:
                await links.lock_trees((user_id, root_seen))
                if await links.root_of(user_id) != root_seen:
                    continue  # the tree was linked under another while we waited: lock the new root
                if await links.was_erased(user_id):
                    return  # a notice already on its way when the user was erased: nothing to record
                referrer_id = await links.confirm_user(user_id)
                if referrer_id is not None:
                    await links.events.publish(
                        REFERRAL_CONFIRMED, {"referrer_id": referrer_id, "referral_id": user_id}
                    )
            if referrer_id is not None:
                log.info("referral link confirmed", extra={"referral_id": str(user_id)})
            return
        raise ServiceUnavailable("The referral tree is changing quickly; try again.")

    async def erase_user(self, user_id: uuid.UUID, replacement_id: uuid.UUID | None) -> None:
        """The auth service erased the account: remove the person here. Idempotent.

        Their codes are deleted (their texts stay taken: never issued again) and keep no owner or
        address; every link of theirs is re-keyed to `replacement_id` (random, chosen by the auth
        service, which re-keyed what it holds of them to it), their own link loses their address: the
        referrers above keep their counts at every level, the referrals below keep their referrer, and
        nothing points at the person. Under the locks of the person's tree (and the replacement's,
        which a link delivered first may have started), like any link. The subject is recorded as
        erased: their tokens are refused here, and a link or notice that was on its way when the
        erasure came cannot bring their id back. Then their cache entries are replaced.
        """
        replacement = replacement_id or uuid.uuid4()
        deny_until = self.clock() + self.deny_for
        for _ in range(LINK_ATTEMPTS):
            root_seen = await self.referrals.root_of(user_id)
            async with self.uow.begin() as links:
                await links.lock_trees((user_id, root_seen, replacement))
                if await links.root_of(user_id) != root_seen:
                    continue  # the tree was linked under another while we waited: lock the new root
                codes, emails = await links.erase(user_id, replacement, deny_until)
            if self.deny_list is not None:  # the auth service wrote it already, unless Redis was down then
                await self.deny_list.deny(user_id, deny_until)
            await self.cache.user_erased(codes, emails)
            log.warning("user erased", extra={"user_id": str(user_id)})
            return
        raise ServiceUnavailable("The referral tree is changing quickly; try again.")

    async def _link(
        self,
        referral_id: uuid.UUID,
        referrer_id: uuid.UUID,
        email: str,
        code: str,
        *,
        code_id: uuid.UUID | None,
        email_verified: bool,
    ) -> Linked:
        """Write the link unless it would make a cycle, under locks on both trees it joins.

        The referral has no referrer (else the link is refused), so it is the root of its own tree;
        the link closes a cycle exactly when it is also the root of the referrer's tree. Locking both
        roots (in a fixed order) serializes every pair of links that could close a cycle together.
        The referral's lock is also the one the auth service's notice for them takes, and the write
        reads the proven users after it: a notice and a link never both miss each other.
        """
        for _ in range(LINK_ATTEMPTS):
            root_seen = await self.referrals.root_of(referrer_id)
            async with self.uow.begin() as links:
                await links.lock_trees((referral_id, root_seen))
                root = await links.root_of(referrer_id)
                if root != root_seen:
                    continue  # the tree grew while we waited for its lock: lock the new root
                if await links.was_erased(referral_id) or await links.was_erased(referrer_id):
                    raise UserErased("The link names an erased user.")
                existing = await links.referral_of(referral_id)
                if existing is not None:
                    if existing.referrer_id == referrer_id:
                        return Linked(existing, created=False)
                    raise AlreadyReferred()
                if root == referral_id:
                    raise ReferralCycle()
                try:
                    if code_id is None:
                        referral = await links.add(
                            referral_id, referrer_id, email, code, email_verified=email_verified
                        )
                    else:
                        added = await links.add_by_active_code(
                            referral_id, email, code_id, email_verified=email_verified
                        )
                        if added is None:
                            raise CodeExpired()
                        referral = added
                except AlreadyLinked:
                    raise AlreadyReferred() from None
                # The use, in the link's transaction (an exhausted code rolls the link back): an
                # activation takes one; a signup's link consumes the one its signup reserved, or takes
                # one when it has no reservation (it expired).
                use_of = code_id
                if code_id is None and not await links.consume_reservation(referral_id):
                    unreserved = await self.codes.by_code(code)
                    use_of = unreserved.id if unreserved is not None else None
                if use_of is not None and not await links.take_use(use_of):
                    raise CodeExhausted()
                await links.events.publish(
                    REFERRAL_CREATED,
                    {
                        "referrer_id": referral.referrer_id,
                        "referral_id": referral.referral_id,
                        "status": referral.status,
                        "created_at": referral.created_at,
                    },
                )
                return Linked(referral, created=True)
        raise ServiceUnavailable("The referral tree is changing quickly; try again.")

    async def referrals_of(
        self, referrer_id: uuid.UUID, limit: int, after: Cursor | None, *, viewer_id: uuid.UUID
    ) -> ReferralPage:
        """A page of the referrer's referrals, newest first, with the total and the confirmed count;
        the emails are the viewer's to see only when the viewer is the referrer."""
        total, confirmed, items = await self.referrals.page(referrer_id, limit + 1, after)
        more = len(items) > limit
        items = items[:limit]
        next_cursor = Cursor(items[-1].joined_at, uuid.UUID(items[-1].referral_id)) if more else None
        return ReferralPage(
            referrer_id, total, confirmed, items, next_cursor, emails_visible=viewer_id == referrer_id
        )

    async def export_user(self, user_id: uuid.UUID) -> UserExport:
        """The auth service's data export: everything this service holds about the user, each code
        with what became of it (active, expired, deleted)."""
        records = await self.referrals.records_of(user_id)
        now = self.clock()
        return UserExport(
            user_id=user_id,
            as_of=now,
            codes=[CodeRecord(code, code.state(now)) for code in records.codes],
            referrer=records.referrer,
            referrals=records.referrals,
            email_verified_at=records.email_verified_at,
        )

    # --- the referral program ----------------------------------------------------------------------

    async def stats(self, referrer_id: uuid.UUID, *, viewer_id: uuid.UUID) -> ReferrerStats:
        """The referrer's referrals by level (1 to `stats_depth`) and active code; theirs alone to see."""
        if viewer_id != referrer_id:
            raise Forbidden("Only the referrer may see their statistics.")
        counted, code = await self.program.stats(referrer_id, self.stats_depth)
        by_level = {count.level: count for count in counted}
        levels = [by_level.get(level, LevelCount(level, 0, 0)) for level in range(1, self.stats_depth + 1)]
        return ReferrerStats(referrer_id, levels, code)

    async def leaderboard(self, period: str, limit: int) -> Leaderboard:
        """The first `limit` referrers of the current period, ranked, their emails masked."""
        ranked = await self.program.leaderboard(period, limit)
        items = [
            LeaderboardEntry(
                rank,
                entry.referrer_id,
                mask_email(entry.email) if entry.email is not None else None,
                entry.confirmed,
            )
            for rank, entry in enumerate(ranked, start=1)
        ]
        return Leaderboard(period, items)
