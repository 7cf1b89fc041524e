"""Use cases of the auth service: signup, the two OAuth2 grants, revocation, the current user."""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from services.auth.db.identities import IdentityRepository
from services.auth.db.repositories import (
    EmailAlreadyUsed,
    ReferralOutboxRepository,
    RefreshTokenRepository,
    ReusedToken,
    Rotated,
    UserRepository,
)
from services.auth.domain.errors import (
    EmailTaken,
    EmailUndeliverable,
    ReferralCodeExpired,
    ReferralCodeNotFound,
    ReferralServiceUnavailable,
    UserGone,
    invalid_grant,
    login_throttled,
)
from services.auth.domain.models import PendingLink, ReferralCode, ReferralLink, Session, TokenPair, User
from services.auth.domain.passwords import PasswordHasher
from services.auth.email_verification import EmailVerifier
from services.auth.enrichment import EnrichmentScheduler
from services.auth.outbox import ReferralOutboxRelay
from services.auth.referrals import InactiveCode, ReferralClient, ReferralServiceError, UnknownCode
from services.auth.signing import AccessTokenIssuer
from services.auth.throttle import LoginThrottle
from shared.db import Connection, Database

log = logging.getLogger(__name__)

REFRESH_TOKEN_BYTES = 32
BAD_CREDENTIALS = "invalid username or password"


def hash_refresh_token(token: str) -> bytes:
    """Only this digest is stored: a database leak yields no usable refresh token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass
class AuthService:
    """The auth use cases, with their collaborators."""

    database: Database
    users: UserRepository
    refresh_tokens: RefreshTokenRepository
    hasher: PasswordHasher
    issuer: AccessTokenIssuer
    throttle: LoginThrottle
    refresh_ttl: timedelta
    referrals: ReferralClient
    referral_outbox: ReferralOutboxRepository
    referral_relay: ReferralOutboxRelay
    identities: IdentityRepository
    # Optional vendors: None when their API key is not configured.
    email_verifier: EmailVerifier | None = None
    enrichment: EnrichmentScheduler | None = None

    async def _new_refresh_token(
        self, conn: Connection, user_id: uuid.UUID, family_id: uuid.UUID, parent_id: uuid.UUID | None
    ) -> str:
        token = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        await self.refresh_tokens.add(
            conn,
            token_hash=hash_refresh_token(token),
            user_id=user_id,
            family_id=family_id,
            parent_id=parent_id,
            ttl=self.refresh_ttl,
        )
        return token

    def _pair(self, user_id: uuid.UUID, email: str, refresh_token: str) -> TokenPair:
        access = self.issuer.issue(user_id, email=email)
        return TokenPair(access.token, refresh_token, access.expires_in)

    async def check_referral_code(self, code: str) -> ReferralCode:
        """The code as the referral service vouches for it: 404, 410, or 503 when it cannot say."""
        try:
            return await self.referrals.check_code(code)
        except UnknownCode:
            raise ReferralCodeNotFound("No referral code matches referral_code.") from None
        except InactiveCode:
            raise ReferralCodeExpired("The referral code has expired or was deleted.") from None
        except ReferralServiceError as error:
            log.warning("referral code check failed: %s", error)
            raise ReferralServiceUnavailable(
                "The referral service did not answer; nothing was created, retry shortly."
            ) from None

    async def check_email(self, email: str) -> dict[str, Any] | None:
        """The verifier's verdict to store as the user's `email_check`; None when no verifier is set.

        Raises EmailUndeliverable (422) for an invalid or disposable address. Anything else,
        including a verifier that could not answer (`unchecked`), lets the signup proceed.
        """
        if self.email_verifier is None:
            return None
        check = await self.email_verifier.verify(email)
        if check.undeliverable:
            log.info("signup refused: undeliverable email", extra={"email_status": check.status})
            raise EmailUndeliverable()
        return check.as_record()

    def enrich_later(self, user: User) -> None:
        """Start the user's profile enrichment in the background (after the commit); never waits."""
        if self.enrichment is not None:
            self.enrichment.schedule(user.id, user.email)

    async def signup(self, email: str, password: str, referral_code: str | None) -> Session:
        """Create a user with a password and sign them in; with a code, link them to its owner.

        The code is checked before anything is written (404, 410, or 503 when it cannot be checked).
        The email verifier (when configured) is asked after the cheap checks and before the costly
        hash; an undeliverable address is 422 and creates nothing.
        """
        if await self.users.email_exists(email):
            raise EmailTaken()
        code = await self.check_referral_code(referral_code) if referral_code is not None else None
        email_check = await self.check_email(email)
        password_hash = await self.hasher.hash(password)
        return await self.register(email, password_hash=password_hash, code=code, email_check=email_check)

    async def register(
        self,
        email: str,
        *,
        password_hash: str | None,
        code: ReferralCode | None,
        email_check: dict[str, Any] | None,
        identity: tuple[str, str] | None = None,
    ) -> Session:
        """Write a new user and sign them in: password and provider signups end here.

        The user, their provider identity (if any), their first refresh token and the referral link
        to deliver are one transaction; the link is then delivered at once, and by the outbox relay
        if that fails: the signup does not depend on it. Enrichment starts after the commit.
        """
        pending: PendingLink | None = None
        try:
            async with self.database.transaction() as conn:
                user = await self.users.add(
                    conn, email, password_hash, code.owner_id if code else None, email_check=email_check
                )
                if identity is not None:
                    await self.identities.add(conn, identity[0], identity[1], user.id, user.email)
                refresh = await self._new_refresh_token(conn, user.id, uuid.uuid4(), None)
                if code is not None:
                    link = ReferralLink(user.id, code.owner_id, user.email, code.code)
                    pending = await self.referral_outbox.add(conn, link, lease=self.referral_relay.lease)
        except EmailAlreadyUsed:
            raise EmailTaken() from None
        log.info(
            "user signed up",
            extra={
                "user_id": str(user.id),
                "referrer_id": str(code.owner_id) if code else None,
                "provider": identity[0] if identity else None,
            },
        )
        self.enrich_later(user)
        if pending is not None:
            await self.referral_relay.deliver_now(pending)
        return Session(user, self._pair(user.id, user.email, refresh))

    async def sign_in(self, user: User, *, link_identity: tuple[str, str] | None = None) -> Session:
        """A new login (a refresh-token family of its own) for an existing user.

        With `link_identity`, the provider identity is attached to the user in the same transaction.
        """
        async with self.database.transaction() as conn:
            if link_identity is not None:
                await self.identities.add(conn, link_identity[0], link_identity[1], user.id, user.email)
            refresh = await self._new_refresh_token(conn, user.id, uuid.uuid4(), None)
        return Session(user, self._pair(user.id, user.email, refresh))

    async def password_grant(self, username: str, password: str, client_address: str) -> TokenPair:
        """RFC 6749 section 4.3; the same answer, in about the same time, for unknown and wrong."""
        # The attempt is counted before the password is checked (a failure keeps its place).
        retry_after = await self.throttle.reserve(username, client_address)
        if retry_after is not None:
            raise login_throttled(retry_after)
        try:
            credentials = await self.users.credentials(username.strip())
            password_hash = credentials.password_hash if credentials is not None else None
            if password_hash is None:
                await self.hasher.verify_dummy(password)
            right = password_hash is not None and await self.hasher.verify(password_hash, password)
        except Exception:
            await self.throttle.undecided(username, client_address)  # no verdict: nothing counted
            raise
        if credentials is None or password_hash is None or not right:
            raise invalid_grant(BAD_CREDENTIALS)
        await self.throttle.succeeded(username, client_address)
        user = credentials.user
        if self.hasher.needs_rehash(password_hash):
            await self.users.set_password_hash(user.id, await self.hasher.hash(password))
        return (await self.sign_in(user)).tokens

    async def refresh_grant(self, refresh_token: str) -> TokenPair:
        """RFC 6749 section 6 with rotation; a rotated token presented again revokes its family."""
        token_hash = hash_refresh_token(refresh_token)
        async with self.database.transaction() as conn:
            outcome = await self.refresh_tokens.rotate(conn, token_hash)
            if isinstance(outcome, Rotated):
                refresh = await self._new_refresh_token(
                    conn, outcome.user_id, outcome.family_id, outcome.token_id
                )
        if isinstance(outcome, ReusedToken):
            revoked = await self.refresh_tokens.revoke_family(outcome.family_id)
            log.warning(
                "refresh token reuse detected; family revoked",
                extra={"family_id": str(outcome.family_id), "tokens_revoked": revoked},
            )
            raise invalid_grant("refresh token was already used; the session has been revoked")
        if outcome is None:
            raise invalid_grant("refresh token is invalid, expired or revoked")
        user = await self.users.get(outcome.user_id)
        if user is None:
            raise invalid_grant("refresh token is invalid, expired or revoked")
        return self._pair(user.id, user.email, refresh)

    async def revoke(self, token: str) -> None:
        """RFC 7009: revoke the refresh token's whole family; unknown tokens are silently accepted."""
        family_id = await self.refresh_tokens.family_of(hash_refresh_token(token))
        if family_id is not None:
            await self.refresh_tokens.revoke_family(family_id)

    async def current_user(self, user_id: uuid.UUID) -> User:
        user = await self.users.get(user_id)
        if user is None:
            raise UserGone()
        return user
