"""Account erasure in schema `auth`: everything personal of one user removed in the caller's
transaction, the erasure queued for the referral service, the subject denied (shared/denylist.py).

Deleting the users row removes, by its foreign keys (ON DELETE CASCADE), the identities, refresh
tokens (every login), mailed tokens, pending mails, and the undelivered referral link and "verified"
notice of the user. What no foreign key reaches is removed here: the stored answers of signups with an
`Idempotency-Key` that hold the user (found by the id in the stored body), and the `referrer_id` other
users hold of them (it becomes the replacement id the referral service re-keys the person to, as do
the undelivered links of the user's own referrals).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, update

from services.auth.adapters.db.tables import (
    erased_subjects_table,
    erasure_outbox_table,
    idempotency_keys_table,
    referral_outbox_table,
    users_table,
)
from services.auth.domain.models import Erasure
from shared.db import Connection, prepare, prepare_sql
from shared.denylist import DenyListStatements
from shared.outbox_store import Executor, OutboxStatements, TableOutbox

DENY_LIST = DenyListStatements(erased_subjects_table)

_DELETE_USER = prepare(
    delete(users_table).where(users_table.c.id == bindparam("id")).returning(users_table.c.email)
)
# Signup's stored answers hold the new user (id, email, tokens); the id is in every one of them.
_DELETE_IDEMPOTENT_ANSWERS = prepare_sql("""
DELETE FROM auth.idempotency_keys
WHERE body IS NOT NULL AND position(convert_to(%(id)s, 'UTF8') IN body) > 0
""")
_REKEY_REFERRER = prepare(
    update(users_table)
    .where(users_table.c.referrer_id == bindparam("id"))
    .values(referrer_id=bindparam("replacement"))
)
_REKEY_PENDING_LINKS = prepare(
    update(referral_outbox_table)
    .where(referral_outbox_table.c.referrer_id == bindparam("id"))
    .values(referrer_id=bindparam("replacement"))
)
_INSERT_ERASURE = prepare(
    insert(erasure_outbox_table)
    .values(
        user_id=bindparam("user_id"),
        replacement_id=bindparam("replacement_id"),
        attempts=1,
        next_attempt_at=func.now() + bindparam("lease"),
    )
    .returning(erasure_outbox_table.c.id)
)
assert idempotency_keys_table.name == "idempotency_keys"  # the table _DELETE_IDEMPOTENT_ANSWERS names


class ErasureRepository:
    """The erasure's writes, on one transaction's connection (the Transaction's `erasures`)."""

    def __init__(self, conn: Connection, *, lease: Any) -> None:
        self._conn = conn
        self._lease = lease

    async def erase(
        self, user_id: uuid.UUID, replacement_id: uuid.UUID, tokens_expire_at: datetime
    ) -> Erasure | None:
        """Remove the user and everything personal of theirs; queue the referral service's part
        (claimed for the lease: the caller delivers it at once); deny the subject. None when gone."""
        row = await self._conn.fetch_one(_DELETE_USER, {"id": user_id})
        if row is None:
            return None
        params = {"id": user_id, "replacement": replacement_id}
        await self._conn.execute(_DELETE_IDEMPOTENT_ANSWERS, {"id": str(user_id)})
        await self._conn.execute(_REKEY_REFERRER, params)
        await self._conn.execute(_REKEY_PENDING_LINKS, params)
        queued = await self._conn.fetch_one(
            _INSERT_ERASURE, {"user_id": user_id, "replacement_id": replacement_id, "lease": self._lease}
        )
        assert queued is not None
        await DENY_LIST.record_in(self._conn, user_id, tokens_expire_at)
        return Erasure(queued["id"], user_id, replacement_id, row["email"])


# --- the outbox of erasures ---------------------------------------------------------------------------

# Once delivered, nothing in the row points at the person any more.
_ERASURES = OutboxStatements(
    erasure_outbox_table, "id", on_delivered={"user_id": None, "replacement_id": None}
)


def _erasure(row: Mapping[str, Any]) -> Erasure:
    return Erasure(row["id"], row["user_id"], row["replacement_id"], None)


class ErasureOutboxRepository(TableOutbox[Erasure]):
    """Erasures waiting to be carried to the referral service (`DELETE /internal/v1/users/{id}`)."""

    def __init__(self, database: Executor) -> None:
        super().__init__(database, _ERASURES, "id", _erasure)
