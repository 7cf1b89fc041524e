"""The auth service's outboxes in PostgreSQL: referral links, "verified" notices and mails.

Each is a table with the same delivery columns (tables.py, `_delivery_columns`), claimed and marked by
the same statements (`_Statements`), and read by the relay of shared/outbox.py through the store
protocol it defines.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Column, Table, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.auth.adapters.db.repositories import Executor
from services.auth.adapters.db.tables import mail_outbox_table, referral_outbox_table, verified_outbox_table
from services.auth.domain.models import ReferralLink
from shared.db import prepare
from shared.outbox import Claimed

T = TypeVar("T")
LAST_ERROR_MAX = 200


class _Statements:
    """Claim and bookkeeping of one outbox table, keyed by `key`; `on_delivered` values are set too."""

    def __init__(self, table: Table, key: str, *, on_delivered: Mapping[str, Any] | None = None) -> None:
        column: Column[Any] = table.c[key]
        pending = (table.c.delivered_at.is_(None), table.c.failed_at.is_(None))
        # Claim due rows atomically: SKIP LOCKED lets replicas claim disjoint rows at the same moment,
        # and moving next_attempt_at past the lease keeps them from being claimed again while in flight.
        due = (
            select(column)
            .where(*pending, table.c.next_attempt_at <= func.now())
            .order_by(table.c.next_attempt_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
        self.claim_due = prepare(
            update(table)
            .where(column.in_(due.scalar_subquery()))
            .values(next_attempt_at=func.now() + bindparam("lease"), attempts=table.c.attempts + 1)
            .returning(*table.c)
        )
        self.mark_delivered = prepare(
            update(table)
            .where(column == bindparam("key"), table.c.delivered_at.is_(None))
            .values(delivered_at=func.now(), failed_at=None, last_error=None, **(on_delivered or {}))
        )
        self.mark_failed = prepare(
            update(table)
            .where(column == bindparam("key"), table.c.delivered_at.is_(None))
            .values(failed_at=func.now(), last_error=bindparam("last_error"))
        )
        self.retry_later = prepare(
            update(table)
            .where(column == bindparam("key"), *pending)
            .values(next_attempt_at=func.now() + bindparam("delay"), last_error=bindparam("last_error"))
        )


class _Outbox(Generic[T]):
    """The store protocol of shared/outbox.py over one table; rows become items by `item`.

    Built on the database for the relay; on a transaction's connection for the writers' `add`."""

    def __init__(
        self,
        database: Executor,
        statements: _Statements,
        key: str,
        item: Callable[[Mapping[str, Any]], T],
    ) -> None:
        self._db = database
        self._statements = statements
        self._key = key
        self._item = item

    def _claimed(self, row: Mapping[str, Any]) -> Claimed[T]:
        return Claimed(self._item(row), row[self._key], row["attempts"], row["created_at"])

    async def claim_due(self, *, limit: int, lease: timedelta) -> list[Claimed[T]]:
        """Claim up to `limit` due rows for one attempt each; nobody else gets them until `lease` ends."""
        rows = await self._db.fetch_all(self._statements.claim_due, {"limit": limit, "lease": lease})
        return [self._claimed(row) for row in rows]

    async def mark_delivered(self, key: Any) -> None:
        await self._db.execute(self._statements.mark_delivered, {"key": key})

    async def mark_failed(self, key: Any, error: str) -> None:
        """Never tried again."""
        await self._db.execute(
            self._statements.mark_failed, {"key": key, "last_error": error[:LAST_ERROR_MAX]}
        )

    async def retry_later(self, key: Any, delay: timedelta, error: str) -> None:
        await self._db.execute(
            self._statements.retry_later, {"key": key, "delay": delay, "last_error": error[:LAST_ERROR_MAX]}
        )


# --- referral links --------------------------------------------------------------------------------

_LINKS = _Statements(referral_outbox_table, "referral_id")
# A new link is written already claimed by the signup that delivers it at once: attempts 1, leased.
_INSERT_LINK = prepare(
    insert(referral_outbox_table).values(
        referral_id=bindparam("referral_id"),
        referrer_id=bindparam("referrer_id"),
        referral_email=bindparam("referral_email"),
        code=bindparam("code"),
        attempts=1,
        next_attempt_at=func.now() + bindparam("lease"),
    )
)


def _link(row: Mapping[str, Any]) -> ReferralLink:
    return ReferralLink(row["referral_id"], row["referrer_id"], row["referral_email"], row["code"])


class ReferralOutboxRepository(_Outbox[ReferralLink]):
    """Referral links waiting to be delivered to the referral service, with their attempts.

    `add` writes a link claimed for `lease` by its writer, which delivers it at once after the commit
    (`relays.ImmediateReferralDelivery`); the relay takes it over if that fails."""

    def __init__(self, database: Executor, *, lease: timedelta = timedelta(0)) -> None:
        super().__init__(database, _LINKS, "referral_id", _link)
        self._lease = lease

    async def add(self, link: ReferralLink) -> None:
        """Write the link (in the signup's transaction), claimed by the writer for the lease."""
        await self._db.execute(
            _INSERT_LINK,
            {
                "referral_id": link.referral_id,
                "referrer_id": link.referrer_id,
                "referral_email": link.referral_email,
                "code": link.code,
                "lease": self._lease,
            },
        )


# --- "verified" notices ----------------------------------------------------------------------------

_NOTICES = _Statements(verified_outbox_table, "user_id")
# Once per user: an address proven again (a password reset) changes nothing the referral service keeps.
_INSERT_NOTICE = prepare(
    pg_insert(verified_outbox_table)
    .values(user_id=bindparam("user_id"))
    .on_conflict_do_nothing(index_elements=["user_id"])
)


class VerifiedOutboxRepository(_Outbox[uuid.UUID]):
    """Users whose address became proven, to be told to the referral service (it confirms their link)."""

    def __init__(self, database: Executor) -> None:
        super().__init__(database, _NOTICES, "user_id", lambda row: row["user_id"])

    async def add(self, user_id: uuid.UUID) -> None:
        """In the transaction that marks the address proven."""
        await self._db.execute(_INSERT_NOTICE, {"user_id": user_id})


# --- mails -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    """A mail to send: its kind (the template), its recipient, the link it carries."""

    id: uuid.UUID
    user_id: uuid.UUID
    recipient: str
    kind: str
    link: str
    created_at: datetime


# The link holds a live token: once the mail is sent, the row keeps no copy of it.
_MAILS = _Statements(mail_outbox_table, "id", on_delivered={"link": None})
_INSERT_MAIL = prepare(
    insert(mail_outbox_table).values(
        user_id=bindparam("user_id"),
        recipient=bindparam("recipient"),
        kind=bindparam("kind"),
        link=bindparam("link"),
    )
)


def _mail(row: Mapping[str, Any]) -> OutgoingMail:
    return OutgoingMail(
        row["id"], row["user_id"], row["recipient"], row["kind"], row["link"] or "", row["created_at"]
    )


class MailOutboxRepository(_Outbox[OutgoingMail]):
    """Mails waiting to be sent, with their attempts; the relay wakes on each new one."""

    def __init__(self, database: Executor) -> None:
        super().__init__(database, _MAILS, "id", _mail)

    async def add(self, *, user_id: uuid.UUID, recipient: str, kind: str, link: str) -> None:
        """In the transaction that made the token the link carries."""
        await self._db.execute(
            _INSERT_MAIL, {"user_id": user_id, "recipient": recipient, "kind": kind, "link": link}
        )
