"""The unit of work over PostgreSQL: one aiopg transaction, and the repositories bound to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta

from services.auth.adapters.db.erasure import ErasureRepository
from services.auth.adapters.db.identities import IdentityRepository
from services.auth.adapters.db.mail_tokens import MailTokenRepository
from services.auth.adapters.db.outboxes import (
    MailOutboxRepository,
    ReferralOutboxRepository,
    VerifiedOutboxRepository,
)
from services.auth.adapters.db.repositories import RefreshTokenRepository, UserRepository
from services.auth.adapters.db.tables import webhook_outbox_table
from shared.db import Connection, Database
from shared.webhooks import WebhookEvents


class PostgresTransaction:
    """Every repository the use cases write through, on one transaction's connection."""

    def __init__(
        self, conn: Connection, *, referral_lease: timedelta, webhook_endpoints: Sequence[str] = ()
    ) -> None:
        self.users = UserRepository(conn)
        self.refresh_tokens = RefreshTokenRepository(conn)
        self.identities = IdentityRepository(conn)
        self.mail_tokens = MailTokenRepository(conn)
        self.referral_outbox = ReferralOutboxRepository(conn, lease=referral_lease)
        self.verified_outbox = VerifiedOutboxRepository(conn)
        self.mail_outbox = MailOutboxRepository(conn)
        self.events = WebhookEvents(conn, webhook_outbox_table, webhook_endpoints)
        # An erasure is written claimed by its writer too, for the same lease (the same call timeout).
        self.erasures = ErasureRepository(conn, lease=referral_lease)


class PostgresUnitOfWork:
    """`transaction()`: committed when the block ends, rolled back when it raises.

    `referral_lease` is how long a referral link written by a signup stays claimed by that signup (its
    immediate delivery) before the relay may take it: the relay's own lease. `webhook_endpoints`: where
    the events published in a transaction go (`tx.events`); none: events are not written.
    """

    def __init__(
        self, database: Database, *, referral_lease: timedelta, webhook_endpoints: Sequence[str] = ()
    ) -> None:
        self._database = database
        self._referral_lease = referral_lease
        self._webhook_endpoints = tuple(webhook_endpoints)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        async with self._database.transaction() as conn:
            yield PostgresTransaction(
                conn, referral_lease=self._referral_lease, webhook_endpoints=self._webhook_endpoints
            )
