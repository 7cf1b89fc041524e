"""Repositories of users and refresh tokens: SQL in, domain objects out.

Each repository runs its statements on what it was built with: the database (a statement each, as its
own transaction) or one transaction's connection (`unit_of_work.PostgresTransaction`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update

from services.auth.adapters.db.tables import refresh_tokens_table as rt
from services.auth.adapters.db.tables import users_table as users
from services.auth.domain.errors import EmailAlreadyUsed
from services.auth.domain.models import Client, Credentials, LoginSession, ReusedToken, Rotated, User
from shared.db import Connection, Database, UniqueViolation, prepare

# Where a repository runs its statements: the pool (each its own transaction) or one transaction.
Executor = Database | Connection

EMAIL_UNIQUE = "users_email_lower_key"

_USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.created_at,
    users.c.referrer_id,
    users.c.email_check,
    users.c.profile,
    users.c.email_verified,
)

_INSERT_USER = prepare(
    insert(users)
    .values(
        id=func.coalesce(bindparam("id", type_=users.c.id.type), func.gen_random_uuid()),
        email=bindparam("email"),
        password_hash=bindparam("password_hash"),
        referrer_id=bindparam("referrer_id"),
        email_check=bindparam("email_check"),
        email_verified=bindparam("email_verified"),
    )
    .returning(*_USER_COLUMNS)
)
_USER_BY_ID = prepare(select(*_USER_COLUMNS).where(users.c.id == bindparam("id")))
_CREDENTIALS_BY_EMAIL = prepare(
    select(*_USER_COLUMNS, users.c.password_hash).where(func.lower(users.c.email) == bindparam("email"))
)
_EMAIL_EXISTS = prepare(select(users.c.id).where(func.lower(users.c.email) == bindparam("email")))
_SET_PASSWORD_HASH = prepare(
    update(users).where(users.c.id == bindparam("id")).values(password_hash=bindparam("password_hash"))
)
_MARK_VERIFIED = prepare(
    update(users).where(users.c.id == bindparam("id")).values(email_verified=True).returning(*_USER_COLUMNS)
)
# A provider vouching for the address of an unverified account: whoever made it loses it (API.md).
_TAKE_OVER = prepare(
    update(users)
    .where(users.c.id == bindparam("id"))
    .values(password_hash=None, email_verified=True)
    .returning(*_USER_COLUMNS)
)
_SET_PROFILE = prepare(
    update(users).where(users.c.id == bindparam("id")).values(profile=bindparam("profile"))
)

_INSERT_REFRESH = prepare(
    insert(rt).values(
        token_hash=bindparam("token_hash"),
        user_id=bindparam("user_id"),
        family_id=bindparam("family_id"),
        parent_id=bindparam("parent_id"),
        expires_at=func.now() + bindparam("ttl"),
        # A login's first token: now (the transaction's time, its created_at too); a rotation copies it.
        login_at=func.coalesce(bindparam("login_at", type_=rt.c.login_at.type), func.now()),
        user_agent=bindparam("user_agent"),
        address=bindparam("address"),
    )
)
# Rotation claims the presented token atomically: only a live token is marked rotated, once.
_ROTATE = prepare(
    update(rt)
    .where(
        rt.c.token_hash == bindparam("token_hash"),
        rt.c.rotated_at.is_(None),
        rt.c.revoked_at.is_(None),
        rt.c.expires_at > func.now(),
    )
    .values(rotated_at=func.now())
    .returning(rt.c.id, rt.c.user_id, rt.c.family_id, rt.c.login_at)
)
_TOKEN_STATE = prepare(
    select(rt.c.family_id, rt.c.rotated_at, rt.c.revoked_at).where(rt.c.token_hash == bindparam("token_hash"))
)
_FAMILY_OF = prepare(select(rt.c.family_id).where(rt.c.token_hash == bindparam("token_hash")))
_REVOKE_USER_FAMILIES = prepare(
    update(rt)
    .where(
        rt.c.user_id == bindparam("user_id"),
        rt.c.family_id != bindparam("keep_family"),
        rt.c.revoked_at.is_(None),
    )
    .values(revoked_at=func.now())
)
_REVOKE_FAMILY = prepare(
    update(rt)
    .where(rt.c.family_id == bindparam("family_id"), rt.c.revoked_at.is_(None))
    .values(revoked_at=func.now())
)

# The sessions: each live family's one live token (not rotated, not revoked, not expired) carries them.
_live = (rt.c.rotated_at.is_(None), rt.c.revoked_at.is_(None), rt.c.expires_at > func.now())
_LIVE_SESSIONS = prepare(
    select(rt.c.family_id, rt.c.login_at, rt.c.created_at, rt.c.user_agent, rt.c.address)
    .where(rt.c.user_id == bindparam("user_id"), *_live)
    .order_by(rt.c.created_at.desc(), rt.c.family_id)
)
# The session's live token, locked. A refresh that is rotating it holds its lock until it commits: this
# waits for that, then finds the token rotated and skips it (the next attempt sees its successor).
_LOCK_SESSION = prepare(
    select(rt.c.id)
    .where(rt.c.family_id == bindparam("family_id"), rt.c.user_id == bindparam("user_id"), *_live)
    .with_for_update()
)
_REVOKE_USER_FAMILY = prepare(
    update(rt)
    .where(
        rt.c.family_id == bindparam("family_id"),
        rt.c.user_id == bindparam("user_id"),
        rt.c.revoked_at.is_(None),
    )
    .values(revoked_at=func.now())
)
# How often a session's revocation looks again for its live token when a refresh rotated it meanwhile.
SESSION_REVOKE_ATTEMPTS = 3


def _user(row: Mapping[str, Any]) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        created_at=row["created_at"],
        referrer_id=row["referrer_id"],
        email_check=row["email_check"],
        profile=row["profile"],
        email_verified=row["email_verified"],
    )


class UserRepository:
    """Users by id and by email (compared case-insensitively)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def email_exists(self, email: str) -> bool:
        return await self._db.fetch_one(_EMAIL_EXISTS, {"email": email.lower()}) is not None

    async def add(
        self,
        email: str,
        password_hash: str | None,
        referrer_id: uuid.UUID | None = None,
        *,
        email_check: Mapping[str, Any] | None = None,
        email_verified: bool = False,
        user_id: uuid.UUID | None = None,
    ) -> User:
        """Insert a user (with `user_id`, or a generated id); EmailAlreadyUsed when the email is taken."""
        params = {
            "id": user_id,
            "email": email,
            "password_hash": password_hash,
            "referrer_id": referrer_id,
            "email_check": dict(email_check) if email_check is not None else None,
            "email_verified": email_verified,
        }
        try:
            row = await self._db.fetch_one(_INSERT_USER, params)
        except UniqueViolation as violation:
            if violation.constraint == EMAIL_UNIQUE:
                raise EmailAlreadyUsed(email) from None
            raise
        assert row is not None
        return _user(row)

    async def get(self, user_id: uuid.UUID) -> User | None:
        row = await self._db.fetch_one(_USER_BY_ID, {"id": user_id})
        return _user(row) if row else None

    async def credentials(self, email: str) -> Credentials | None:
        row = await self._db.fetch_one(_CREDENTIALS_BY_EMAIL, {"email": email.lower()})
        return Credentials(_user(row), row["password_hash"]) if row else None

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        await self._db.execute(_SET_PASSWORD_HASH, {"id": user_id, "password_hash": password_hash})

    async def mark_verified(self, user_id: uuid.UUID) -> User | None:
        """The address is proven; the user as it now is (None when gone)."""
        row = await self._db.fetch_one(_MARK_VERIFIED, {"id": user_id})
        return _user(row) if row else None

    async def take_over(self, user_id: uuid.UUID) -> User | None:
        """Drop the password and mark the address proven (the caller removes identities and sessions)."""
        row = await self._db.fetch_one(_TAKE_OVER, {"id": user_id})
        return _user(row) if row else None

    async def set_profile(self, user_id: uuid.UUID, profile: Mapping[str, Any]) -> bool:
        """Store the enriched profile; False when the user no longer exists."""
        return await self._db.execute(_SET_PROFILE, {"id": user_id, "profile": dict(profile)}) > 0


class RefreshTokenRepository:
    """Refresh tokens, stored only as SHA-256 hashes, grouped in families (one login each)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def add(
        self,
        *,
        token_hash: bytes,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        parent_id: uuid.UUID | None,
        ttl: timedelta,
        client: Client | None = None,
        login_at: datetime | None = None,
    ) -> None:
        """A new token of the family; `login_at` None: a login's first token (now)."""
        await self._db.execute(
            _INSERT_REFRESH,
            {
                "token_hash": token_hash,
                "user_id": user_id,
                "family_id": family_id,
                "parent_id": parent_id,
                "ttl": ttl,
                "login_at": login_at,
                "user_agent": client.user_agent if client else None,
                "address": client.address if client else None,
            },
        )

    async def rotate(self, token_hash: bytes) -> Rotated | ReusedToken | None:
        """Mark a live token rotated; say so when it was rotated before; None when unknown or dead."""
        row = await self._db.fetch_one(_ROTATE, {"token_hash": token_hash})
        if row is not None:
            return Rotated(row["id"], row["user_id"], row["family_id"], row["login_at"])
        state = await self._db.fetch_one(_TOKEN_STATE, {"token_hash": token_hash})
        if state is not None and state["rotated_at"] is not None:
            return ReusedToken(state["family_id"])
        return None

    async def family_of(self, token_hash: bytes) -> uuid.UUID | None:
        row = await self._db.fetch_one(_FAMILY_OF, {"token_hash": token_hash})
        return row["family_id"] if row else None

    async def revoke_all(self, user_id: uuid.UUID, *, keep: uuid.UUID | None = None) -> int:
        """Revoke every live token of the user, but those of the family `keep`; return how many."""
        params = {"user_id": user_id, "keep_family": keep or uuid.UUID(int=0)}
        return await self._db.execute(_REVOKE_USER_FAMILIES, params)

    async def revoke_family(self, family_id: uuid.UUID) -> int:
        """Revoke every token of the family still standing; return how many."""
        return await self._db.execute(_REVOKE_FAMILY, {"family_id": family_id})

    async def live_sessions(self, user_id: uuid.UUID) -> list[LoginSession]:
        """The user's live logins, the most recently used first."""
        rows = await self._db.fetch_all(_LIVE_SESSIONS, {"user_id": user_id})
        return [
            LoginSession(
                id=row["family_id"],
                created_at=row["login_at"],
                last_used_at=row["created_at"],
                user_agent=row["user_agent"],
                address=row["address"],
            )
            for row in rows
        ]

    async def revoke_session(self, user_id: uuid.UUID, family_id: uuid.UUID) -> bool:
        """Revoke the user's live login `family_id`; False when it is not one (another user's, ended).

        Run inside a transaction: the live token is locked first, so no refresh rotates it before the
        family is revoked, and a refresh already rotating it is waited for and its new token revoked.
        """
        params = {"user_id": user_id, "family_id": family_id}
        for _ in range(SESSION_REVOKE_ATTEMPTS):
            if await self._db.fetch_one(_LOCK_SESSION, params) is not None:
                await self._db.execute(_REVOKE_USER_FAMILY, params)
                return True
        return False
