"""Identities at sign-in providers: which user a provider's subject belongs to."""

from __future__ import annotations

import uuid

from sqlalchemy import bindparam, delete, insert, select

from services.auth.adapters.db.repositories import Executor
from services.auth.adapters.db.tables import identities_table as identities
from services.auth.domain.errors import IdentityAlreadyLinked
from services.auth.domain.models import LinkedIdentity
from shared.db import UniqueViolation, prepare

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


_OF_USER = prepare(
    select(identities.c.provider, identities.c.subject, identities.c.email, identities.c.created_at)
    .where(identities.c.user_id == bindparam("user_id"))
    .order_by(identities.c.created_at, identities.c.provider, identities.c.subject)
)
_REMOVE_ALL = prepare(delete(identities).where(identities.c.user_id == bindparam("user_id")))


class IdentityRepository:
    """(provider, subject) -> user id; a subject names at most one user, whatever the concurrency."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def user_for(self, provider: str, subject: str) -> uuid.UUID | None:
        """The user linked to this identity, or None."""
        params = {"provider": provider, "subject": subject}
        row = await self._db.fetch_one(_USER_FOR, params)
        return row["user_id"] if row else None

    async def add(self, provider: str, subject: str, user_id: uuid.UUID, email: str) -> None:
        """Link the identity to the user; IdentityAlreadyLinked if it is linked already."""
        params = {"provider": provider, "subject": subject, "user_id": user_id, "email": email}
        try:
            await self._db.execute(_INSERT_IDENTITY, params)
        except UniqueViolation as violation:
            if violation.constraint == IDENTITY_KEY:
                raise IdentityAlreadyLinked(provider, subject) from None
            raise

    async def of_user(self, user_id: uuid.UUID) -> list[LinkedIdentity]:
        """The user's identities, oldest first."""
        rows = await self._db.fetch_all(_OF_USER, {"user_id": user_id})
        return [LinkedIdentity(r["provider"], r["subject"], r["email"], r["created_at"]) for r in rows]

    async def remove_all(self, user_id: uuid.UUID) -> int:
        """Unlink every identity of the user; how many there were."""
        return await self._db.execute(_REMOVE_ALL, {"user_id": user_id})
