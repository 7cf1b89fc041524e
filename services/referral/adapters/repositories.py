"""PostgreSQL adapters of the referral service: SQL in, domain objects out.

The repositories and the unit of work implement the ports of domain/ports.py over `shared.db`
(aiopg connections); every statement is compiled once, at import.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.referral.adapters.tables import code_reservations_table as reservations
from services.referral.adapters.tables import codes_table as codes
from services.referral.adapters.tables import erased_subjects_table, webhook_outbox_table
from services.referral.adapters.tables import referrals_table as referrals
from services.referral.adapters.tables import verified_users_table as verified_users
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
    UserRecords,
)
from services.referral.domain.ports import AlreadyLinked, CodeTextTaken, OpenCodeExists
from shared.db import Connection, Database, UniqueViolation, prepare, prepare_sql
from shared.denylist import DenyListStatements
from shared.webhooks import WebhookEvents

DENY_LIST = DenyListStatements(erased_subjects_table)

ONE_OPEN_PER_OWNER = "codes_one_open_per_owner"
CODE_UNIQUE = "codes_code_lower_key"

_CODE_COLUMNS = (
    codes.c.id,
    codes.c.code,
    codes.c.owner_id,
    codes.c.owner_email,
    codes.c.expires_at,
    codes.c.created_at,
    codes.c.deleted_at,
    codes.c.max_uses,
    codes.c.uses,
)
_REFERRAL_COLUMNS = (
    referrals.c.referrer_id,
    referrals.c.referral_id,
    referrals.c.referral_email,
    referrals.c.code,
    referrals.c.created_at,
    referrals.c.status,
)
_active = (codes.c.deleted_at.is_(None), codes.c.expires_at > func.now())

# An expired code is closed (deleted_at = its expiry) before its owner opens the next one.
_CLOSE_EXPIRED = prepare(
    update(codes)
    .where(codes.c.owner_id == bindparam("owner_id"), codes.c.deleted_at.is_(None))
    .where(codes.c.expires_at <= func.now())
    .values(deleted_at=codes.c.expires_at)
)
_INSERT_CODE = prepare(
    insert(codes)
    .values(
        code=bindparam("code"),
        owner_id=bindparam("owner_id"),
        owner_email=bindparam("owner_email"),
        expires_at=bindparam("expires_at"),
        max_uses=bindparam("max_uses"),
    )
    .returning(*_CODE_COLUMNS)
)
_ACTIVE_BY_OWNER = prepare(select(*_CODE_COLUMNS).where(codes.c.owner_id == bindparam("owner_id"), *_active))
_DELETE_ACTIVE = prepare(
    update(codes)
    .where(codes.c.owner_id == bindparam("owner_id"), *_active)
    .values(deleted_at=func.now())
    .returning(*_CODE_COLUMNS)
)
_ACTIVE_BY_EMAIL = prepare(
    select(*_CODE_COLUMNS)
    .where(func.lower(codes.c.owner_email) == bindparam("email"), *_active)
    .order_by(codes.c.created_at.desc())
    .limit(1)
)
_BY_CODE = prepare(select(*_CODE_COLUMNS).where(func.lower(codes.c.code) == bindparam("code")))

# --- usage limits (migration 0005) ---
# One more use, only while one is left: the UPDATE takes the code's row lock, and a racer that waited
# for it re-reads the row (READ COMMITTED) and finds the limit reached. Whichever statement takes the
# lock first, an activation's or a signup's reservation, gets the use.
_has_use_left = or_(codes.c.max_uses.is_(None), codes.c.uses < codes.c.max_uses)
_TAKE_USE = prepare(
    update(codes)
    .where(codes.c.id == bindparam("code_id"), _has_use_left)
    .values(uses=codes.c.uses + 1)
    .returning(codes.c.id)
)
_TAKE_USE_OF_ACTIVE = prepare(
    update(codes)
    .where(codes.c.id == bindparam("code_id"), _has_use_left, *_active)
    .values(uses=codes.c.uses + 1)
    .returning(*_CODE_COLUMNS)
)
_INSERT_RESERVATION = prepare(
    insert(reservations)
    .values(
        referral_id=bindparam("referral_id"),
        code_id=bindparam("code_id"),
        expires_at=bindparam("expires_at"),
    )
    .returning(reservations.c.expires_at)
)
_RESERVATION_OF = prepare(
    select(*_CODE_COLUMNS, reservations.c.expires_at.label("reserved_until"))
    .select_from(reservations.join(codes, codes.c.id == reservations.c.code_id))
    .where(reservations.c.referral_id == bindparam("referral_id"))
)
_CONSUME_RESERVATION = prepare(
    delete(reservations)
    .where(reservations.c.referral_id == bindparam("referral_id"))
    .returning(reservations.c.referral_id)
)
# A reservation removed and its use given back, in one statement.
_RELEASE = prepare_sql("""
WITH gone AS (
    DELETE FROM referral.code_reservations r USING referral.codes c
    WHERE r.referral_id = %(referral_id)s AND c.id = r.code_id AND lower(c.code) = %(code)s
    RETURNING r.code_id
)
UPDATE referral.codes c SET uses = c.uses - 1 FROM gone WHERE c.id = gone.code_id RETURNING c.id
""")
# One sweeper at a time (two would delete the same rows in different orders and could deadlock).
_LOCK_SWEEP = prepare_sql("SELECT pg_advisory_xact_lock(hashtextextended('referral-reservation-sweep', 0))")
_RELEASE_EXPIRED = prepare_sql("""
WITH gone AS (
    DELETE FROM referral.code_reservations WHERE expires_at <= %(now)s RETURNING code_id
), counted AS (
    SELECT code_id, count(*) AS n FROM gone GROUP BY code_id
)
UPDATE referral.codes c SET uses = c.uses - counted.n FROM counted WHERE c.id = counted.code_id
RETURNING counted.n
""")

_REFERRAL_OF = prepare(select(*_REFERRAL_COLUMNS).where(referrals.c.referral_id == bindparam("referral_id")))

# A new link's status, decided by the statement that writes it: confirmed when the referral's address
# is proven, by the caller's token (`email_verified`) or by the auth service's notice (verified_users),
# else pending. The link's transaction runs this statement after it holds the lock of the referral's
# tree, the lock a notice takes too (see `ReferralUseCases.confirm_user`), and in READ COMMITTED each
# statement sees what was committed before it began: a notice that got the lock first is seen here, one
# that gets it later finds the link and confirms it. No interleaving leaves a proven user's link pending.
_STATUS = case(
    (
        or_(
            bindparam("email_verified", type_=Boolean),
            exists().where(verified_users.c.user_id == bindparam("referral_id")),
        ),
        literal_column(f"'{CONFIRMED}'"),
    ),
    else_=literal_column(f"'{PENDING}'"),
)
# The link is written only while the code is still active, checked in the same statement.
_INSERT_REFERRAL_BY_ACTIVE_CODE = prepare(
    insert(referrals)
    .from_select(
        ["referral_id", "referrer_id", "referral_email", "code", "status"],
        select(
            bindparam("referral_id", type_=referrals.c.referral_id.type),
            codes.c.owner_id,
            bindparam("referral_email", type_=referrals.c.referral_email.type),
            codes.c.code,
            _STATUS,
        ).where(codes.c.id == bindparam("code_id"), *_active),
    )
    .returning(*_REFERRAL_COLUMNS)
)
_INSERT_REFERRAL = prepare(
    insert(referrals)
    .values(
        referral_id=bindparam("referral_id"),
        referrer_id=bindparam("referrer_id"),
        referral_email=bindparam("referral_email"),
        code=bindparam("code"),
        status=_STATUS,
    )
    .returning(*_REFERRAL_COLUMNS)
)

# The auth service's notice: the user's address is proven. Recorded (for a link that comes later, and
# for code creation) and their pending link confirmed, in one statement, after the tree lock.
_CONFIRM_USER = prepare(
    update(referrals)
    .add_cte(
        pg_insert(verified_users)
        .values(user_id=bindparam("user_id"))
        .on_conflict_do_nothing(index_elements=[verified_users.c.user_id])
        .cte("recorded")
    )
    .where(
        referrals.c.referral_id == bindparam("user_id"), referrals.c.status == literal_column(f"'{PENDING}'")
    )
    .values(status=literal_column(f"'{CONFIRMED}'"))
    .returning(referrals.c.referrer_id)
)
_IS_VERIFIED = prepare(
    select(verified_users.c.user_id).where(verified_users.c.user_id == bindparam("user_id"))
)
# One page of a referrer's referrals, newest first, with their total and confirmed count (kept by
# triggers in referrer_totals, one row), in one statement: one round trip, one snapshot. The counts'
# side is an aggregate, so it always answers one row and an empty page still has a row (its referral
# columns NULL). Rows come back as tuples with the id as text: the page shows it as text, and a dict
# and a UUID per row cost more than the rest of the request.
_PAGE = """
SELECT t.total, t.confirmed, p.referral_id::text, p.referral_email, p.created_at, p.status
FROM (
    SELECT coalesce(max(total), 0) AS total, coalesce(max(confirmed), 0) AS confirmed
    FROM referral.referrer_totals WHERE referrer_id = %(referrer_id)s
) AS t
LEFT JOIN LATERAL (
    SELECT referral_id, referral_email, created_at, status
    FROM referral.referrals
    WHERE referrer_id = %(referrer_id)s{after}
    ORDER BY created_at DESC, referral_id DESC
    LIMIT %(limit)s
) AS p ON true
ORDER BY p.created_at DESC, p.referral_id DESC
"""
_FIRST_PAGE = prepare_sql(_PAGE.format(after=""))
_NEXT_PAGE = prepare_sql(
    _PAGE.format(after=" AND (created_at, referral_id) < (%(after_created_at)s, %(after_referral_id)s)")
)

# Walk up the referrer chain from a user to the root of their tree (each user has one referrer at most).
_ROOT_OF = prepare_sql("""
WITH RECURSIVE chain(user_id, depth) AS (
    SELECT %(user_id)s::uuid, 0
    UNION ALL
    SELECT r.referrer_id, chain.depth + 1
    FROM referral.referrals r JOIN chain ON r.referral_id = chain.user_id
    WHERE chain.depth < 100000
)
SELECT user_id FROM chain ORDER BY depth DESC LIMIT 1
""")
# A user's data export (the internal export endpoint): one snapshot, read only.
# Plain text: a SET cannot be a prepared statement.
_EXPORT_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
_CODES_OF_OWNER = prepare(
    select(*_CODE_COLUMNS)
    .where(codes.c.owner_id == bindparam("user_id"))
    .order_by(codes.c.created_at, codes.c.id)
)
_LINK_OF = prepare(
    select(*_REFERRAL_COLUMNS, referrals.c.confirmed_at).where(
        referrals.c.referral_id == bindparam("user_id")
    )
)
_LINKS_OF_REFERRER = prepare(
    select(*_REFERRAL_COLUMNS, referrals.c.confirmed_at)
    .where(referrals.c.referrer_id == bindparam("user_id"))
    .order_by(referrals.c.created_at, referrals.c.referral_id)
)
_VERIFIED_AT = prepare(
    select(verified_users.c.verified_at).where(verified_users.c.user_id == bindparam("user_id"))
)
_LOCK_TREE = prepare_sql(
    "SELECT pg_advisory_xact_lock(hashtextextended('referral-tree:' || %(user_id)s::text, 0))"
)


def _code(row: Mapping[str, Any]) -> ReferralCode:
    return ReferralCode(
        id=row["id"],
        code=row["code"],
        owner_id=row["owner_id"],
        owner_email=row["owner_email"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        deleted_at=row["deleted_at"],
        max_uses=row["max_uses"],
        uses=row["uses"],
    )


def _referral(row: Mapping[str, Any]) -> Referral:
    return Referral(
        referrer_id=row["referrer_id"],
        referral_id=row["referral_id"],
        referral_email=row["referral_email"],
        code=row["code"],
        created_at=row["created_at"],
        status=row["status"],
        confirmed_at=row.get("confirmed_at"),
    )


class PostgresCodeRepository:
    """Referral codes read on a pooled connection, and their uses reserved (the CodeRepository port)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def active_of(self, owner_id: uuid.UUID) -> ReferralCode | None:
        row = await self._db.fetch_one(_ACTIVE_BY_OWNER, {"owner_id": owner_id})
        return _code(row) if row else None

    async def active_by_email(self, email: str) -> ReferralCode | None:
        row = await self._db.fetch_one(_ACTIVE_BY_EMAIL, {"email": email.lower()})
        return _code(row) if row else None

    async def by_code(self, code: str) -> ReferralCode | None:
        """The code with this text (any state), compared case-insensitively."""
        row = await self._db.fetch_one(_BY_CODE, {"code": code.lower()})
        return _code(row) if row else None

    async def reserve(
        self, code_id: uuid.UUID, referral_id: uuid.UUID, expires_at: datetime
    ) -> Reservation | None:
        """Take a use of the active code and record it for the referral, in one transaction; None when
        the code is inactive or has no use left; the referral's reservation when it has one already."""
        try:
            async with self._db.transaction() as conn:
                row = await conn.fetch_one(_TAKE_USE_OF_ACTIVE, {"code_id": code_id})
                if row is None:
                    return None
                reserved = await conn.fetch_one(
                    _INSERT_RESERVATION,
                    {"referral_id": referral_id, "code_id": code_id, "expires_at": expires_at},
                )
        except UniqueViolation:  # the same referral at the same moment: its use was rolled back
            return await self.reservation_of(referral_id)
        assert reserved is not None
        return Reservation(referral_id, _code(row), reserved["expires_at"])

    async def reservation_of(self, referral_id: uuid.UUID) -> Reservation | None:
        row = await self._db.fetch_one(_RESERVATION_OF, {"referral_id": referral_id})
        return Reservation(referral_id, _code(row), row["reserved_until"]) if row else None

    async def release(self, referral_id: uuid.UUID, code: str) -> bool:
        """Remove the unconsumed reservation and give its use back; True when there was one."""
        return (
            await self._db.fetch_one(_RELEASE, {"referral_id": referral_id, "code": code.lower()}) is not None
        )

    async def release_expired(self, now: datetime) -> int:
        """Give back the uses of the reservations expired at `now` (one sweeper at a time)."""
        async with self._db.transaction() as conn:
            await conn.execute(_LOCK_SWEEP)
            rows = await conn.fetch_all(_RELEASE_EXPIRED, {"now": now})
        return sum(int(row["n"]) for row in rows)


async def _root_of(conn: Connection | Database, user_id: uuid.UUID) -> uuid.UUID:
    row = await conn.fetch_one(_ROOT_OF, {"user_id": user_id})
    assert row is not None
    return row["user_id"]  # type: ignore[no-any-return]


class PostgresReferralRepository:
    """Who referred whom, read on a pooled connection (the ReferralRepository port)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def root_of(self, user_id: uuid.UUID) -> uuid.UUID:
        """The top of the user's referrer chain (the user when nobody referred them)."""
        return await _root_of(self._db, user_id)

    async def page(
        self, referrer_id: uuid.UUID, limit: int, after: Cursor | None
    ) -> tuple[int, int, list[ListedReferral]]:
        """The referrer's total and confirmed count, and up to `limit` referrals, newest first, strictly
        after the cursor."""
        params: dict[str, Any] = {"referrer_id": referrer_id, "limit": limit}
        if after is None:
            rows = await self._db.fetch_tuples(_FIRST_PAGE, params)
        else:
            params.update(after_created_at=after.created_at, after_referral_id=after.referral_id)
            rows = await self._db.fetch_tuples(_NEXT_PAGE, params)
        total, confirmed = (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)
        items = [ListedReferral(row[2], row[3], row[4], row[5]) for row in rows if row[2] is not None]
        return total, confirmed, items

    async def is_verified(self, user_id: uuid.UUID) -> bool:
        """Whether the auth service told us the user's address is proven."""
        return await self._db.fetch_one(_IS_VERIFIED, {"user_id": user_id}) is not None

    async def records_of(self, user_id: uuid.UUID) -> UserRecords:
        """The user's codes, link, referrals and proof, read in one repeatable-read snapshot."""
        params = {"user_id": user_id}
        async with self._db.transaction() as conn:
            await conn.execute(_EXPORT_SNAPSHOT)
            owned = await conn.fetch_all(_CODES_OF_OWNER, params)
            link = await conn.fetch_one(_LINK_OF, params)
            referred = await conn.fetch_all(_LINKS_OF_REFERRER, params)
            verified = await conn.fetch_one(_VERIFIED_AT, params)
        return UserRecords(
            user_id=user_id,
            codes=[_code(row) for row in owned],
            referrer=_referral(link) if link else None,
            referrals=[_referral(row) for row in referred],
            email_verified_at=verified["verified_at"] if verified else None,
        )


class PostgresLinks:
    """Who referred whom, the codes opened and deleted, and the events published, on the connection of
    one transaction (the Links port)."""

    def __init__(self, conn: Connection, webhook_endpoints: Sequence[str] = ()) -> None:
        self._conn = conn
        self.events = WebhookEvents(conn, webhook_outbox_table, webhook_endpoints)

    async def open_code(
        self,
        owner_id: uuid.UUID,
        owner_email: str,
        code: str,
        expires_at: datetime,
        max_uses: int | None = None,
    ) -> ReferralCode:
        """Open a code; OpenCodeExists or CodeTextTaken when a unique index refuses it (the database
        keeps one open code per owner and unique code texts)."""
        await self._conn.execute(_CLOSE_EXPIRED, {"owner_id": owner_id})
        try:
            row = await self._conn.fetch_one(
                _INSERT_CODE,
                {
                    "code": code,
                    "owner_id": owner_id,
                    "owner_email": owner_email,
                    "expires_at": expires_at,
                    "max_uses": max_uses,
                },
            )
        except UniqueViolation as violation:
            if violation.constraint == ONE_OPEN_PER_OWNER:
                raise OpenCodeExists from None
            if violation.constraint == CODE_UNIQUE:
                raise CodeTextTaken from None
            raise
        assert row is not None
        return _code(row)

    async def delete_active_code(self, owner_id: uuid.UUID) -> ReferralCode | None:
        """Delete the owner's active code; the deleted code, or None when there was none."""
        row = await self._conn.fetch_one(_DELETE_ACTIVE, {"owner_id": owner_id})
        return _code(row) if row else None

    async def lock_trees(self, roots: Iterable[uuid.UUID]) -> None:
        """Transaction-scoped advisory locks on the trees rooted at `roots`, always in the same order."""
        for root in sorted(set(roots)):
            await self._conn.execute(_LOCK_TREE, {"user_id": str(root)})

    async def root_of(self, user_id: uuid.UUID) -> uuid.UUID:
        return await _root_of(self._conn, user_id)

    async def referral_of(self, referral_id: uuid.UUID) -> Referral | None:
        row = await self._conn.fetch_one(_REFERRAL_OF, {"referral_id": referral_id})
        return _referral(row) if row else None

    async def add_by_active_code(
        self, referral_id: uuid.UUID, referral_email: str, code_id: uuid.UUID, *, email_verified: bool
    ) -> Referral | None:
        """Link the user to the code's owner if the code is still active; None if it is not.

        Confirmed when `email_verified` or the user is in verified_users, else pending; call it with
        the referral's tree locked (`lock_trees`).
        """
        try:
            row = await self._conn.fetch_one(
                _INSERT_REFERRAL_BY_ACTIVE_CODE,
                {
                    "referral_id": referral_id,
                    "referral_email": referral_email,
                    "code_id": code_id,
                    "email_verified": email_verified,
                },
            )
        except UniqueViolation:
            raise AlreadyLinked from None
        return _referral(row) if row else None

    async def add(
        self,
        referral_id: uuid.UUID,
        referrer_id: uuid.UUID,
        referral_email: str,
        code: str,
        *,
        email_verified: bool,
    ) -> Referral:
        """Link the user to the referrer unconditionally (the code was checked at signup); the status
        as in `add_by_active_code`."""
        try:
            row = await self._conn.fetch_one(
                _INSERT_REFERRAL,
                {
                    "referral_id": referral_id,
                    "referrer_id": referrer_id,
                    "referral_email": referral_email,
                    "code": code,
                    "email_verified": email_verified,
                },
            )
        except UniqueViolation:
            raise AlreadyLinked from None
        assert row is not None
        return _referral(row)

    async def take_use(self, code_id: uuid.UUID) -> bool:
        """One more use of the code if one is left; its row stays locked until the transaction ends."""
        return await self._conn.fetch_one(_TAKE_USE, {"code_id": code_id}) is not None

    async def consume_reservation(self, referral_id: uuid.UUID) -> bool:
        """Remove the referral's reservation (its use becomes the link's); False when there was none."""
        return await self._conn.fetch_one(_CONSUME_RESERVATION, {"referral_id": referral_id}) is not None

    async def was_erased(self, user_id: uuid.UUID) -> bool:
        """Whether the user was erased here (their id may only come back in a late delivery)."""
        return await DENY_LIST.was_erased(self._conn, user_id)

    async def erase(
        self, user_id: uuid.UUID, replacement_id: uuid.UUID, tokens_expire_at: datetime
    ) -> tuple[list[ReferralCode], set[str]]:
        """Remove the person: their codes stay deleted under `replacement_id` without their address, every
        link of theirs is re-keyed to `replacement_id` (their own without their address), their own
        counters move with them, their reservation and proof go, stored answers naming them go; the
        subject is recorded as erased. Call it with the trees locked. The codes as they were, and the
        addresses the person had here (for the cache)."""
        params = {"id": user_id, "replacement": replacement_id}
        before = await self._conn.fetch_all(_ERASED_CODES_BEFORE, params)
        emails = {row["owner_email"] for row in before}
        erased_codes = await self._conn.fetch_all(_ERASE_CODES, params)
        links = await self._conn.fetch_all(_TAKE_OUT_LINKS, params)
        await self._conn.execute(_DROP_COUNTERS, params)
        put_back = []
        for link in links:
            mine = link["referral_id"] == user_id
            if mine:
                emails.add(link["referral_email"])
            put_back.append(
                {
                    "referral_id": str(replacement_id if mine else link["referral_id"]),
                    "referrer_id": str(
                        replacement_id if link["referrer_id"] == user_id else link["referrer_id"]
                    ),
                    "referral_email": "" if mine else link["referral_email"],
                    "code": link["code"],
                    "created_at": link["created_at"].isoformat(),
                    "status": link["status"],
                    "confirmed_at": link["confirmed_at"].isoformat() if link["confirmed_at"] else None,
                }
            )
        if put_back:
            await self._conn.execute(_PUT_BACK_LINKS, {"links": json.dumps(put_back)})
        await self._conn.execute(_RELEASE_OWN_RESERVATION, params)
        await self._conn.execute(_FORGET_VERIFIED, params)
        emails.discard("")
        await self._conn.execute(
            _DELETE_IDEMPOTENT_ANSWERS,
            {"id": str(user_id), "emails": [f"%{_escape_like(e.lower())}%" for e in sorted(emails)]},
        )
        await DENY_LIST.record_in(self._conn, user_id, tokens_expire_at)
        return [_code(row) for row in erased_codes], emails

    async def confirm_user(self, user_id: uuid.UUID) -> uuid.UUID | None:
        """Record that the user's address is proven and confirm their pending link, if any (one
        statement, idempotent); the referrer of the link confirmed now, else None. Call it with the
        user's tree locked (`lock_trees`): see `_STATUS`."""
        row = await self._conn.fetch_one(_CONFIRM_USER, {"user_id": user_id})
        return row["referrer_id"] if row else None


# --- erasure (migration 0009): the person goes, their place in the trees stays under a random id ----

_ERASED_CODES_BEFORE = prepare(
    select(codes.c.code, codes.c.owner_email).where(codes.c.owner_id == bindparam("id"))
)
# The codes stay, deleted, under the replacement id and without the address: their texts keep their
# place in the unique index (a text once given out is never given out again).
_ERASE_CODES = prepare(
    update(codes)
    .where(codes.c.owner_id == bindparam("id"))
    .values(
        owner_id=bindparam("replacement"),
        owner_email="",
        deleted_at=func.coalesce(codes.c.deleted_at, func.least(func.now(), codes.c.expires_at)),
    )
    .returning(*_CODE_COLUMNS)
)
# The links are taken out and put back re-keyed in two statements, as any delete and insert: the
# statement triggers of 0002, 0003 and 0006 keep every counter exact through them (a pair of ancestor
# and descendant is uncounted once and counted once again), with no trigger of their own to trust.
_TAKE_OUT_LINKS = prepare_sql("""
DELETE FROM referral.referrals WHERE referral_id = %(id)s OR referrer_id = %(id)s
RETURNING referral_id, referrer_id, referral_email, code, created_at, status, confirmed_at
""")
_PUT_BACK_LINKS = prepare_sql("""
INSERT INTO referral.referrals
    (referral_id, referrer_id, referral_email, code, created_at, status, confirmed_at)
SELECT referral_id, referrer_id, referral_email, code, created_at, status, confirmed_at
FROM jsonb_to_recordset(%(links)s::jsonb) AS r(
    referral_id uuid, referrer_id uuid, referral_email text, code text, created_at timestamptz,
    status text, confirmed_at timestamptz
)
""")
# After the take-out the person's own counters are all zero: their rows go.
_DROP_COUNTERS = prepare_sql("""
WITH levels AS (DELETE FROM referral.referrer_levels WHERE referrer_id = %(id)s),
     totals AS (DELETE FROM referral.referrer_totals WHERE referrer_id = %(id)s)
DELETE FROM referral.leaderboard_counts WHERE referrer_id = %(id)s
""")
# A use reserved for the person's own signup whose link will never come: given back.
_RELEASE_OWN_RESERVATION = prepare_sql("""
WITH gone AS (DELETE FROM referral.code_reservations WHERE referral_id = %(id)s RETURNING code_id)
UPDATE referral.codes c SET uses = c.uses - 1 FROM gone WHERE c.id = gone.code_id
""")
_FORGET_VERIFIED = prepare(delete(verified_users).where(verified_users.c.user_id == bindparam("id")))
# Stored answers of the person's keyed requests, and of others' that name them (a link to their code).
_DELETE_IDEMPOTENT_ANSWERS = prepare_sql("""
DELETE FROM referral.idempotency_keys
WHERE scope = %(id)s
   OR (body IS NOT NULL AND (
       position(convert_to(%(id)s, 'UTF8') IN body) > 0
       OR lower(convert_from(body, 'UTF8')) LIKE ANY (%(emails)s)
   ))
""")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class PostgresUnitOfWork:
    """One PostgreSQL transaction per `begin()` (the UnitOfWork port): committed when the block ends,
    rolled back when it raises."""

    def __init__(self, database: Database, *, webhook_endpoints: Sequence[str] = ()) -> None:
        self._db = database
        self._webhook_endpoints = tuple(webhook_endpoints)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[PostgresLinks]:
        async with self._db.transaction() as conn:
            yield PostgresLinks(conn, self._webhook_endpoints)


# --- the referral program: counters kept by the triggers of migration 0006 ---------------------------

# A referrer's levels and active code in one statement (one snapshot): the levels' primary key range
# and the one open code, whatever the number of referrals. No level row yet: one row of NULL levels.
_STATS = prepare_sql("""
SELECT l.level, l.total, l.confirmed,
       c.id, c.code, c.owner_id, c.owner_email, c.expires_at, c.created_at, c.deleted_at,
       c.max_uses, c.uses
FROM (SELECT 1) AS one
LEFT JOIN referral.referrer_levels AS l ON l.referrer_id = %(referrer_id)s AND l.level <= %(depth)s
LEFT JOIN LATERAL (
    SELECT id, code, owner_id, owner_email, expires_at, created_at, deleted_at, max_uses, uses
    FROM referral.codes
    WHERE owner_id = %(referrer_id)s AND deleted_at IS NULL AND expires_at > now()
) AS c ON true
ORDER BY l.level
""")
# The first `limit` entries of the current period: a range scan of leaderboard_ranked, each with the
# referrer's email, in a function that runs it on a generic plan (migration 0007_leaderboard_read says
# why: as a plain prepared statement it was planned afresh on every read).
_LEADERBOARD = prepare_sql("""
SELECT referrer_id, confirmed, email FROM referral.leaderboard_top(%(period)s, %(limit)s)
""")


class PostgresProgramRepository:
    """The referral program's counters (the ProgramRepository port)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def stats(self, referrer_id: uuid.UUID, depth: int) -> tuple[list[LevelCount], ReferralCode | None]:
        rows = await self._db.fetch_all(_STATS, {"referrer_id": referrer_id, "depth": depth})
        levels = [
            LevelCount(int(row["level"]), int(row["total"]), int(row["confirmed"]))
            for row in rows
            if row["level"] is not None
        ]
        code = _code(rows[0]) if rows and rows[0]["id"] is not None else None
        return levels, code

    async def leaderboard(self, period: str, limit: int) -> list[Ranked]:
        rows = await self._db.fetch_all(_LEADERBOARD, {"period": period, "limit": limit})
        return [Ranked(row["referrer_id"], row["email"], int(row["confirmed"])) for row in rows]
