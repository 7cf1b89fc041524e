"""Identities at sign-in providers: which user a provider's subject belongs to."""

from __future__ import annotations

import uuid

from sqlalchemy import bindparam, delete, insert, select

from services.auth.db.tables import identities_table as identities
from shared.db import Connection, Database, UniqueViolation, prepare

IDENTITY_KEY = "identities_pkey"

_USER_FOR = prepare(
    select(identities.c.user_id).where(
        identities.c.provider == bindparam("provider"), identities.c.subject == bindparam("subject")
    )
)
_INSERT_IDENTITY = prepare(
    insert(identities).values(
        provider=bindparam("provider"),
        subject=bindparam("subject"),
        user_id=bindparam("user_id"),
        email=bindparam("email"),
    )
)


_REMOVE_ALL = prepare(delete(identities).where(identities.c.user_id == bindparam("user_id")))


class IdentityAlreadyLinked(Exception):
    """This provider's subject is already linked to a user (the primary key refused the insert)."""

    def __init__(self, provider: str, subject: str) -> None:
        super().__init__(f"{provider} identity already linked")
        self.provider = provider
        self.subject = subject


class IdentityRepository:
    """(provider, subject) -> user id; a subject names at most one user, whatever the concurrency."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def user_for(
        self, provider: str, subject: str, *, conn: Connection | None = None
    ) -> uuid.UUID | None:
        """The user linked to this identity, or None; on `conn` when given (inside a transaction)."""
        params = {"provider": provider, "subject": subject}
        row = await (conn or self._db).fetch_one(_USER_FOR, params)
        return row["user_id"] if row else None

    async def add(
        self, conn: Connection, provider: str, subject: str, user_id: uuid.UUID, email: str
    ) -> None:
        """Link the identity to the user in the caller's transaction; IdentityAlreadyLinked if it is."""
        params = {"provider": provider, "subject": subject, "user_id": user_id, "email": email}
        try:
            await conn.execute(_INSERT_IDENTITY, params)
        except UniqueViolation as violation:
            if violation.constraint == IDENTITY_KEY:
                raise IdentityAlreadyLinked(provider, subject) from None
            raise

    async def remove_all(self, conn: Connection, user_id: uuid.UUID) -> int:
        """Unlink every identity of the user, in the caller's transaction; how many there were."""
        return await conn.execute(_REMOVE_ALL, {"user_id": user_id})
