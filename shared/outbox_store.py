"""The PostgreSQL side of a transactional outbox, for any table (shared/outbox.py is the relay side).

Every outbox table has the same delivery columns (`delivery_columns`): its attempts, the time of the
next one (which is also the lease of a claimed row), and the outcome. `OutboxStatements` claims and
marks the rows of one such table, and `TableOutbox` is the relay's store protocol over them. Both
services' outboxes (the auth service's referral links, notices and mails; the webhooks of both) use
these, each with its own table and row type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    Table,
    Text,
    bindparam,
    func,
    select,
    text,
    update,
)

from shared.db import Connection, Database, prepare
from shared.outbox import Claimed

T = TypeVar("T")
Executor = Database | Connection
LAST_ERROR_MAX = 200
# The predicate of an outbox's partial indexes: the rows still to deliver.
PENDING = "delivered_at IS NULL AND failed_at IS NULL"


def delivery_columns(table: str) -> list[Column[Any] | CheckConstraint]:
    """The columns and checks every outbox has: attempts, the lease, the outcome, the last error."""
    return [
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("delivered_at", DateTime(timezone=True)),
        Column("failed_at", DateTime(timezone=True)),
        Column("last_error", Text),
        CheckConstraint("attempts >= 0", name=f"{table}_attempts_not_negative"),
        CheckConstraint(f"char_length(last_error) <= {LAST_ERROR_MAX}", name=f"{table}_last_error_length"),
        CheckConstraint("delivered_at IS NULL OR failed_at IS NULL", name=f"{table}_one_outcome"),
    ]


class OutboxStatements:
    """Claim and bookkeeping of one outbox table, keyed by `key`; `on_delivered` (`on_failed`) values
    are set too when a row is delivered (failed for good)."""

    def __init__(
        self,
        table: Table,
        key: str,
        *,
        on_delivered: Mapping[str, Any] | None = None,
        on_failed: Mapping[str, Any] | None = None,
    ) -> None:
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
            .values(failed_at=func.now(), last_error=bindparam("last_error"), **(on_failed or {}))
        )
        self.retry_later = prepare(
            update(table)
            .where(column == bindparam("key"), *pending)
            .values(next_attempt_at=func.now() + bindparam("delay"), last_error=bindparam("last_error"))
        )
        # Seconds since the oldest row still to deliver was written (0 when none): one index probe
        # when the table has a partial index on created_at for the pending rows.
        self.oldest_pending_age = prepare(
            select(
                func.coalesce(func.extract("epoch", func.now() - func.min(table.c.created_at)), 0).label(
                    "age"
                )
            ).where(*pending)
        )


class TableOutbox(Generic[T]):
    """The store protocol of shared/outbox.py over one table; rows become items by `item`.

    Built on the database for the relay; on a transaction's connection for the writers."""

    def __init__(
        self,
        database: Executor,
        statements: OutboxStatements,
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

    async def oldest_pending_age(self) -> float:
        """Seconds since the oldest row still to deliver was written; 0 when there is none."""
        row = await self._db.fetch_one(self._statements.oldest_pending_age)
        return float(row["age"]) if row is not None else 0.0
