"""What proving an address writes: single-use mail tokens, the mails that carry them, and the notice that
tells the referral service an address is proven. Always in the caller's transaction; the relays that
send them are woken once it has committed (`wake`)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from services.auth.domain.models import RESET_PASSWORD, USER_EMAIL_VERIFIED, VERIFY_EMAIL, User
from services.auth.domain.ports import OutboxWaker, Transaction

MAIL_TOKEN_BYTES = 32  # 256 random bits (API.md: at least 256)
PAGES = {VERIFY_EMAIL: "verify-email", RESET_PASSWORD: "reset-password"}


def hash_mail_token(token: str) -> bytes:
    """Only this digest is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_mail_token() -> tuple[str, bytes]:
    """A fresh token and its digest."""
    token = secrets.token_urlsafe(MAIL_TOKEN_BYTES)
    return token, hash_mail_token(token)


@dataclass
class OwnershipMail:
    """Issues the mails of email ownership (verification, reset) and the "verified" notices."""

    app_url: str  # the front end the links point to: <app_url>/verify-email#token=...
    verification_ttl: timedelta
    reset_ttl: timedelta
    relays: Sequence[OutboxWaker] = ()  # the mail and notice relays, woken after each commit

    def link(self, kind: str, token: str) -> str:
        """The page of `kind` with the token in the fragment: no server or log on the way sees it."""
        return f"{self.app_url.rstrip('/')}/{PAGES[kind]}#token={token}"

    async def send_verification(self, tx: Transaction, user: User) -> None:
        """A verification token for the user's address, and its mail."""
        token, digest = new_mail_token()
        await tx.mail_tokens.add(
            token_hash=digest,
            user_id=user.id,
            purpose=VERIFY_EMAIL,
            email=user.email,
            ttl=self.verification_ttl,
        )
        await tx.mail_outbox.add(
            user_id=user.id, recipient=user.email, kind=VERIFY_EMAIL, link=self.link(VERIFY_EMAIL, token)
        )

    async def send_reset(self, tx: Transaction, email: str) -> bool:
        """A reset token and its mail when an account has `email` (the older reset links die); whether."""
        token, digest = new_mail_token()
        return await tx.mail_tokens.request_reset(
            email=email, token_hash=digest, ttl=self.reset_ttl, link=self.link(RESET_PASSWORD, token)
        )

    async def proven(self, tx: Transaction, user_id: uuid.UUID, *, announce: bool = True) -> None:
        """The user's address is proven: the referral service is told (their pending link confirms),
        and, the first time and with `announce`, the `user.email_verified` event is published (a signup
        proven from the start says so in its `user.created` instead)."""
        if await tx.verified_outbox.add(user_id) and announce:
            await tx.events.publish(USER_EMAIL_VERIFIED, {"user_id": user_id})

    def wake(self) -> None:
        """After the commit: send what was written without waiting for the relays' next look."""
        for relay in self.relays:
            relay.wake()
