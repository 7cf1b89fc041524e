"""Single-use tokens mailed to prove an address or to reset a password, stored only as SHA-256 digests,
and the mails that carry them (written in the same transaction as the token)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import bindparam, func, insert, select, update

from services.auth.adapters.db.repositories import Executor
from services.auth.adapters.db.tables import mail_tokens_table as tokens
from services.auth.domain.models import Taken, TokenOwner
from shared.db import prepare, prepare_sql

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


class MailTokenRepository:
    """Issues, takes (once) and voids mailed tokens."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def add(
        self,
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
        await self._db.execute(_INSERT, params)

    async def take(self, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        """Use the token now (it never works again), or say why it cannot be used."""
        params = {"token_hash": token_hash, "purpose": purpose}
        row = await self._db.fetch_one(_TAKE, params)
        if row is not None:
            return TokenOwner(row["user_id"], row["email"])
        return Taken.EXPIRED if await self._db.fetch_one(_EXPIRED, params) is not None else Taken.UNKNOWN

    async def peek(self, token_hash: bytes, purpose: str) -> TokenOwner | Taken:
        """What `take` would answer now, without using the token."""
        params = {"token_hash": token_hash, "purpose": purpose}
        row = await self._db.fetch_one(_LIVE, params)
        if row is not None:
            return TokenOwner(row["user_id"], row["email"])
        return Taken.EXPIRED if await self._db.fetch_one(_EXPIRED, params) is not None else Taken.UNKNOWN

    async def void(self, user_id: uuid.UUID, purpose: str) -> None:
        """Every live token of this purpose of the user stops working."""
        await self._db.execute(_VOID, {"user_id": user_id, "purpose": purpose})

    async def request_reset(self, *, email: str, token_hash: bytes, ttl: timedelta, link: str) -> bool:
        """Issue a reset token and queue its mail when an account has `email`; whether one does."""
        params = {"email": email.strip().lower(), "token_hash": token_hash, "ttl": ttl, "link": link}
        return await self._db.fetch_one(_REQUEST_RESET, params) is not None
