"""Single-use tokens mailed to prove an address or to reset a password, stored only as SHA-256 digests,
and the mails that carry them (written in the same transaction as the token)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from sqlalchemy import bindparam, func, insert, select, update

from services.auth.db.tables import mail_tokens_table as tokens
from shared.db import Connection, Database, prepare, prepare_sql

VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"  # noqa: S105 (a purpose, not a password)

_INSERT = prepare(
    insert(tokens).values(
        token_hash=bindparam("token_hash"),
        user_id=bindparam("user_id"),
        purpose=bindparam("purpose"),
        email=bindparam("email"),
        expires_at=func.now() + bindparam("ttl"),
    )
)
# Taking a token is one atomic claim: two requests with one token cannot both succeed.
_TAKE = prepare(
    update(tokens)
    .where(
        tokens.c.token_hash == bindparam("token_hash"),
        tokens.c.purpose == bindparam("purpose"),
        tokens.c.used_at.is_(None),
        tokens.c.expires_at > func.now(),
    )
    .values(used_at=func.now())
    .returning(tokens.c.user_id, tokens.c.email)
)
_LIVE = prepare(
    select(tokens.c.user_id, tokens.c.email).where(
        tokens.c.token_hash == bindparam("token_hash"),
        tokens.c.purpose == bindparam("purpose"),
        tokens.c.used_at.is_(None),
        tokens.c.expires_at > func.now(),
    )
)
_EXPIRED = prepare(
    select(tokens.c.user_id).where(
        tokens.c.token_hash == bindparam("token_hash"),
        tokens.c.purpose == bindparam("purpose"),
        tokens.c.used_at.is_(None),
        tokens.c.expires_at <= func.now(),
    )
)
_VOID = prepare(
    update(tokens)
    .where(
        tokens.c.user_id == bindparam("user_id"),
        tokens.c.purpose == bindparam("purpose"),
        tokens.c.used_at.is_(None),
    )
    .values(used_at=func.now())
)
# A reset asked for by email: the same statement whether or not an account has that address (so the
# answer and its timing say nothing), voiding the older reset links of the account when there is one.
_REQUEST_RESET = prepare_sql(
    """
    WITH target AS (
        SELECT id, email FROM auth.users WHERE lower(email) = %(email)s
    ), voided AS (
        UPDATE auth.mail_tokens SET used_at = now()
        WHERE user_id IN (SELECT id FROM target) AND purpose = 'reset_password' AND used_at IS NULL
    ), token AS (
        INSERT INTO auth.mail_tokens (token_hash, user_id, purpose, email, expires_at)
        SELECT %(token_hash)s, id, 'reset_password', email, now() + %(ttl)s FROM target
        RETURNING user_id, email
    )
    INSERT INTO auth.mail_outbox (user_id, recipient, kind, link)
    SELECT user_id, email, 'reset_password', %(link)s FROM token
    RETURNING id
    """
)


class Taken(Enum):
    """Why a token could not be taken."""

    UNKNOWN = "unknown"  # never issued, already used, voided, or for another purpose
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class TokenOwner:
    """A token taken: whose, and the address it was mailed to."""

    user_id: uuid.UUID
    email: str


class MailTokenRepository:
    """Issues, takes (once) and voids mailed tokens."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(
        self,
        conn: Connection,
        *,
        token_hash: bytes,
        user_id: uuid.UUID,
        purpose: str,
        email: str,
        ttl: timedelta,
    ) -> None:
        params = {
            "token_hash": token_hash,
            "user_id": user_id,
            "purpose": purpose,
            "email": email,
            "ttl": ttl,
        }
        await conn.execute(_INSERT, params)

    async def take(self, conn: Connection, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        """Use the token now (it never works again), or say why it cannot be used."""
        params = {"token_hash": token_hash, "purpose": purpose}
        row = await conn.fetch_one(_TAKE, params)
        if row is not None:
            return TokenOwner(row["user_id"], row["email"])
        return Taken.EXPIRED if await conn.fetch_one(_EXPIRED, params) is not None else Taken.UNKNOWN

    async def peek(self, conn: Connection, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        """What `take` would answer now, without using the token."""
        params = {"token_hash": token_hash, "purpose": purpose}
        row = await conn.fetch_one(_LIVE, params)
        if row is not None:
            return TokenOwner(row["user_id"], row["email"])
        return Taken.EXPIRED if await conn.fetch_one(_EXPIRED, params) is not None else Taken.UNKNOWN

    async def void(self, conn: Connection, user_id: uuid.UUID, purpose: str) -> None:
        """Every live token of this purpose of the user stops working."""
        await conn.execute(_VOID, {"user_id": user_id, "purpose": purpose})

    async def request_reset(
        self, conn: Connection, *, email: str, token_hash: bytes, ttl: timedelta, link: str
    ) -> bool:
        """Issue a reset token and queue its mail when an account has `email`; whether one does."""
        params = {"email": email.strip().lower(), "token_hash": token_hash, "ttl": ttl, "link": link}
        return await conn.fetch_one(_REQUEST_RESET, params) is not None
