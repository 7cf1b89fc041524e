"""The auth service's outboxes in PostgreSQL: referral links, "verified" notices and mails.

Each is a table with the same delivery columns (shared/outbox_store.py, `delivery_columns`), claimed
and marked by the same statements (`OutboxStatements`), and read by the relay of shared/outbox.py
through the store protocol it defines (`TableOutbox`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.auth.adapters.db.tables import mail_outbox_table, referral_outbox_table, verified_outbox_table
from services.auth.domain.models import ReferralLink
from shared.db import prepare
from shared.outbox_store import Executor, OutboxStatements, TableOutbox

# --- referral links --------------------------------------------------------------------------------

_LINKS = OutboxStatements(referral_outbox_table, "referral_id")
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


class ReferralOutboxRepository(TableOutbox[ReferralLink]):
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

_NOTICES = OutboxStatements(verified_outbox_table, "user_id")
# Once per user: an address proven again (a password reset) changes nothing the referral service keeps.
_INSERT_NOTICE = prepare(
    pg_insert(verified_outbox_table)
    .values(user_id=bindparam("user_id"))
    .on_conflict_do_nothing(index_elements=["user_id"])
)


class VerifiedOutboxRepository(TableOutbox[uuid.UUID]):
    """Users whose address became proven, to be told to the referral service (it confirms their link)."""

    def __init__(self, database: Executor) -> None:
        super().__init__(database, _NOTICES, "user_id", lambda row: row["user_id"])

    async def add(self, user_id: uuid.UUID) -> bool:
        """In the transaction that marks the address proven; whether it is the user's first notice."""
        return await self._db.execute(_INSERT_NOTICE, {"user_id": user_id}) > 0


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
_MAILS = OutboxStatements(mail_outbox_table, "id", on_delivered={"link": None})
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


class MailOutboxRepository(TableOutbox[OutgoingMail]):
    """Mails waiting to be sent, with their attempts; the relay wakes on each new one."""

    def __init__(self, database: Executor) -> None:
        super().__init__(database, _MAILS, "id", _mail)

    async def add(self, *, user_id: uuid.UUID, recipient: str, kind: str, link: str) -> None:
        """In the transaction that made the token the link carries."""
        await self._db.execute(
            _INSERT_MAIL, {"user_id": user_id, "recipient": recipient, "kind": kind, "link": link}
        )
