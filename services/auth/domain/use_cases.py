"""Use cases of the auth service: signup, the two OAuth2 grants, revocation, the current user,
proving an address (verification mail, password reset and change, signing out everywhere), and the
user's data rights (their sessions, the export of their data, erasing the account)."""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.auth.domain.errors import (
    EmailAlreadyUsed,
    EmailAlreadyVerified,
    EmailTaken,
    EmailUndeliverable,
    ExhaustedCode,
    InactiveCode,
    MailThrottled,
    PasswordChangeThrottled,
    PasswordRequired,
    ReauthenticationRequired,
    ReferralCodeExhausted,
    ReferralCodeExpired,
    ReferralCodeNotFound,
    ReferralDataUnavailable,
    ReferralServiceError,
    ReferralServiceUnavailable,
    ResetExpired,
    ResetInvalid,
    SelfReferral,
    SessionNotFound,
    UnknownCode,
    UserGone,
    VerificationExpired,
    VerificationInvalid,
    WrongPassword,
    invalid_grant,
    invalid_request,
    login_throttled,
    unsupported_grant_type,
)
from services.auth.domain.models import (
    RESET_PASSWORD,
    USER_CREATED,
    USER_DELETED,
    VERIFY_EMAIL,
    Client,
    DataExport,
    LoginSession,
    ReferralCode,
    ReferralLink,
    ReusedToken,
    Rotated,
    Session,
    Taken,
    TokenPair,
    User,
)
from services.auth.domain.ownership import OwnershipMail, hash_mail_token
from services.auth.domain.ports import (
    AccessTokenIssuer,
    DenyList,
    EmailVerifier,
    EnrichmentScheduler,
    ErasureDelivery,
    IdentityRepository,
    LoginThrottle,
    MailLimiter,
    PasswordHasher,
    ReferralCodes,
    ReferralExports,
    ReferralLinkDelivery,
    RefreshTokenRepository,
    Transaction,
    UnitOfWork,
    UserRepository,
)
from shared.emails import is_disposable, same_mailbox

log = logging.getLogger(__name__)

REFRESH_TOKEN_BYTES = 32
BAD_CREDENTIALS = "invalid username or password"


def required(params: Mapping[str, str], name: str) -> str:
    """A parameter of the token endpoint that must be there and not be empty (RFC 6749 invalid_request)."""
    value = params.get(name)
    if not value:
        raise invalid_request(f"missing parameter {name!r}")
    return value


def hash_refresh_token(token: str) -> bytes:
    """Only this digest is stored: a database leak yields no usable refresh token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass
class AuthService:
    """The auth use cases, with their collaborators."""

    uow: UnitOfWork
    users: UserRepository
    refresh_tokens: RefreshTokenRepository
    identities: IdentityRepository
    hasher: PasswordHasher
    issuer: AccessTokenIssuer
    throttle: LoginThrottle
    refresh_ttl: timedelta
    referrals: ReferralCodes
    referral_delivery: ReferralLinkDelivery
    ownership: OwnershipMail
    mail_limiter: MailLimiter
    referral_exports: ReferralExports
    # Optional vendors: None when their API key is not configured.
    email_verifier: EmailVerifier | None = None
    enrichment: EnrichmentScheduler | None = None
    # Refuse addresses of throwaway mail providers, verifier or not (AUTH_BLOCK_DISPOSABLE).
    block_disposable: bool = True
    # Erasure: the deny-list of erased subjects, the delivery of the referral service's part, how long
    # an erased subject stays denied (the longest access token's life, leeway and a margin), and how
    # recent an account without a password needs its token to be.
    deny_list: DenyList | None = None
    erasure_delivery: ErasureDelivery | None = None
    deny_for: timedelta = timedelta(minutes=17)
    reauthentication_window: timedelta = timedelta(minutes=5)

    async def _new_refresh_token(
        self,
        tx: Transaction,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        parent_id: uuid.UUID | None,
        *,
        client: Client | None,
        login_at: datetime | None = None,
    ) -> str:
        """A refresh token of the family, recording the client it was made for (the session's last use)."""
        token = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        await tx.refresh_tokens.add(
            token_hash=hash_refresh_token(token),
            user_id=user_id,
            family_id=family_id,
            parent_id=parent_id,
            ttl=self.refresh_ttl,
            client=client,
            login_at=login_at,
        )
        return token

    def _pair(self, user: User, refresh_token: str, family_id: uuid.UUID) -> TokenPair:
        access = self.issuer.issue(
            user.id, email=user.email, email_verified=user.email_verified, session_id=family_id
        )
        return TokenPair(access.token, refresh_token, access.expires_in)

    async def _login(self, tx: Transaction, user: User, client: Client | None) -> TokenPair:
        """A new login: a refresh-token family of its own (the session, the access token's `sid`), in
        the caller's transaction."""
        family_id = uuid.uuid4()
        refresh = await self._new_refresh_token(tx, user.id, family_id, None, client=client)
        return self._pair(user, refresh, family_id)

    async def reserve_referral_code(self, code: str, user_id: uuid.UUID) -> ReferralCode:
        """One use of the code, taken for the user about to be created with `user_id`, as the referral
        service grants it: 404, 410, 409 `code_exhausted`, or 503 when it cannot say.

        Taken before the user exists, so a signup that would exceed the code's `max_uses` is refused
        before anything is written, and the signup's link, delivered later, consumes this use instead
        of competing for one (it is never refused for want of a use). Every way the signup can fail
        after this gives the use back (`release_referral_code`).
        """
        try:
            return await self.referrals.reserve_code(code, user_id)
        except UnknownCode:
            raise ReferralCodeNotFound("No referral code matches referral_code.") from None
        except InactiveCode:
            raise ReferralCodeExpired("The referral code has expired or was deleted.") from None
        except ExhaustedCode:
            raise ReferralCodeExhausted(
                "The referral code has been used as many times as it allows; nothing was created."
            ) from None
        except ReferralServiceError as error:
            log.warning("referral code reservation failed: %s", error)
            raise ReferralServiceUnavailable(
                "The referral service did not answer; nothing was created, retry shortly."
            ) from None

    async def release_referral_code(self, code: ReferralCode | None, user_id: uuid.UUID) -> None:
        """The signup failed before its user was created: give its reserved use back. Best effort: a
        use not given back now is when its reservation expires (the referral service's sweep)."""
        if code is None:
            return
        try:
            await self.referrals.release_code(code.code, user_id)
        except ReferralServiceError as error:
            log.warning(
                "referral code use not released (it will expire): %s", error, extra={"user_id": str(user_id)}
            )

    async def refuse_self_referral(self, code: ReferralCode, email: str) -> None:
        """SelfReferral (422) when the address is the code owner's own under another spelling (case,
        Gmail dots, googlemail.com, a `+tag`): the referral would be the referrer themself."""
        owner = await self.users.get(code.owner_id)
        if owner is not None and same_mailbox(owner.email, email):
            raise SelfReferral()

    async def check_email(self, email: str) -> dict[str, Any] | None:
        """The verifier's verdict to store as the user's `email_check`; None when no verifier is set.

        Raises EmailUndeliverable (422) for an invalid or disposable address: a domain on the maintained
        list of disposable providers (or under one) is refused without asking the verifier, unless
        `block_disposable` is off. Anything else, including a verifier that could not answer
        (`unchecked`), lets the signup proceed.
        """
        if self.block_disposable and is_disposable(email):
            log.info("signup refused: disposable email domain")
            raise EmailUndeliverable("This address belongs to a disposable mail provider.")
        if self.email_verifier is None:
            return None
        check = await self.email_verifier.verify(email)
        if check.undeliverable:
            log.info("signup refused: undeliverable email", extra={"email_status": check.status})
            raise EmailUndeliverable()
        return check.as_record()

    def enrich_later(self, user: User) -> None:
        """Start the profile enrichment of a proven address in the background (after the commit).

        Never for an unproven one: the vendor would profile whoever the address belongs to.
        """
        if self.enrichment is not None and user.email_verified:
            self.enrichment.schedule(user.id, user.email)

    async def signup(
        self, email: str, password: str, referral_code: str | None, client: Client | None = None
    ) -> Session:
        """Create a user with a password and sign them in; with a code, link them to its owner.

        The code is checked, and a use of it reserved for the new user's id, before anything is
        written (404, 410, 409 `code_exhausted`, or 503 when it cannot be checked). The email verifier
        (when configured) is asked after the cheap checks and before the costly hash; an undeliverable
        address is 422 and creates nothing (and gives the code's use back).
        """
        if await self.users.email_exists(email):
            raise EmailTaken()
        user_id = uuid.uuid4()
        code = await self.reserve_referral_code(referral_code, user_id) if referral_code is not None else None
        try:
            if code is not None:
                await self.refuse_self_referral(code, email)
            email_check = await self.check_email(email)
            password_hash = await self.hasher.hash(password)
        except BaseException:
            await self.release_referral_code(code, user_id)
            raise
        return await self.register(
            email,
            password_hash=password_hash,
            code=code,
            email_check=email_check,
            user_id=user_id,
            client=client,
        )

    async def register(
        self,
        email: str,
        *,
        password_hash: str | None,
        code: ReferralCode | None,
        email_check: dict[str, Any] | None,
        identity: tuple[str, str] | None = None,
        email_verified: bool = False,
        user_id: uuid.UUID | None = None,
        client: Client | None = None,
    ) -> Session:
        """Write a new user and sign them in: password and provider signups end here.

        With a code, `user_id` is the id its use was reserved for (`reserve_referral_code`); if the
        user's transaction does not commit, that use is given back.

        The user, their provider identity (if any), their first refresh token, the referral link to
        deliver, and the verification mail (an unproven address) or the "verified" notice (a provider
        vouched for it) are one transaction; the link is then delivered at once, and by the outbox
        relay if that fails: the signup does not depend on it. Enrichment starts after the commit,
        for a proven address only.
        """
        link: ReferralLink | None = None
        user_id = user_id or uuid.uuid4()
        try:
            if not email_verified:  # the first verification mail counts toward the address's limit
                await self.mail_limiter.reserve(VERIFY_EMAIL, email)
            async with self.uow.transaction() as tx:
                user = await tx.users.add(
                    email,
                    password_hash,
                    code.owner_id if code else None,
                    email_check=email_check,
                    email_verified=email_verified,
                    user_id=user_id,
                )
                if identity is not None:
                    await tx.identities.add(identity[0], identity[1], user.id, user.email)
                await tx.events.publish(
                    USER_CREATED,
                    {
                        "user_id": user.id,
                        "email_verified": user.email_verified,
                        "referrer_id": user.referrer_id,
                        "created_at": user.created_at,
                    },
                )
                tokens = await self._login(tx, user, client)
                if code is not None:
                    link = ReferralLink(user.id, code.owner_id, user.email, code.code)
                    await tx.referral_outbox.add(link)
                if email_verified:
                    await self.ownership.proven(tx, user.id, announce=False)
                else:
                    await self.ownership.send_verification(tx, user)
        except BaseException as error:
            # Nothing was committed: the code's reserved use goes back (a commit whose answer was lost
            # is the one case this misjudges; the link then takes a use again, refused if none is left).
            await self.release_referral_code(code, user_id)
            if isinstance(error, EmailAlreadyUsed):
                raise EmailTaken() from None
            raise
        self.ownership.wake()
        log.info(
            "user signed up",
            extra={
                "user_id": str(user.id),
                "referrer_id": str(code.owner_id) if code else None,
                "provider": identity[0] if identity else None,
            },
        )
        self.enrich_later(user)
        if link is not None:
            await self.referral_delivery.deliver_now(link)
        return Session(user, tokens)

    async def sign_in(
        self, user: User, *, link_identity: tuple[str, str] | None = None, client: Client | None = None
    ) -> Session:
        """A new login (a refresh-token family of its own) for an existing user.

        With `link_identity`, the provider identity is attached to the user in the same transaction.
        """
        async with self.uow.transaction() as tx:
            if link_identity is not None:
                await tx.identities.add(link_identity[0], link_identity[1], user.id, user.email)
            tokens = await self._login(tx, user, client)
        return Session(user, tokens)

    async def take_over(
        self, user: User, *, provider: str, subject: str, client: Client | None = None
    ) -> Session:
        """A provider vouches for the address of an unproven account: its proof wins (API.md).

        Whoever made the account loses it: its password and other identities are removed and every
        login revoked, then the identity is linked, the address marked proven, and the owner signed in.
        """
        async with self.uow.transaction() as tx:
            owned = await tx.users.take_over(user.id)
            if owned is None:
                raise UserGone()
            await tx.identities.remove_all(user.id)
            await tx.refresh_tokens.revoke_all(user.id)
            for purpose in (VERIFY_EMAIL, RESET_PASSWORD):
                await tx.mail_tokens.void(user.id, purpose)
            await tx.identities.add(provider, subject, user.id, user.email)
            await self.ownership.proven(tx, user.id)
            tokens = await self._login(tx, owned, client)
        self.ownership.wake()
        await self.throttle.clear(owned.email)
        log.warning(
            "unproven account taken over by a provider vouching for its address",
            extra={"user_id": str(user.id), "provider": provider},
        )
        self.enrich_later(owned)
        return Session(owned, tokens)

    async def token(
        self, params: Mapping[str, str], client_address: str, *, user_agent: str | None = None
    ) -> TokenPair:
        """The token endpoint (RFC 6749): the password grant or the refresh_token grant, by `grant_type`.

        The client (its address and User-Agent) is recorded on the session the grant signs in or uses.
        """
        grant_type = required(params, "grant_type")
        if grant_type == "password":
            username, password = required(params, "username"), required(params, "password")
            return await self.password_grant(username, password, client_address, user_agent=user_agent)
        if grant_type == "refresh_token":
            return await self.refresh_grant(
                required(params, "refresh_token"), Client.of(user_agent, client_address)
            )
        raise unsupported_grant_type(grant_type)

    async def password_grant(
        self, username: str, password: str, client_address: str, *, user_agent: str | None = None
    ) -> TokenPair:
        """RFC 6749 section 4.3; the same answer, in about the same time, for unknown and wrong."""
        if "\x00" in username:  # no account's email holds U+0000 (and PostgreSQL text cannot)
            raise invalid_grant(BAD_CREDENTIALS)
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
        return (await self.sign_in(user, client=Client.of(user_agent, client_address))).tokens

    async def refresh_grant(self, refresh_token: str, client: Client | None = None) -> TokenPair:
        """RFC 6749 section 6 with rotation; a rotated token presented again revokes its family.

        The new token keeps its login's time and records `client`: the session's last use, and where
        from (the same statements as without sessions: the rotation returns the login's time).
        """
        token_hash = hash_refresh_token(refresh_token)
        async with self.uow.transaction() as tx:
            outcome = await tx.refresh_tokens.rotate(token_hash)
            if isinstance(outcome, Rotated):
                refresh = await self._new_refresh_token(
                    tx,
                    outcome.user_id,
                    outcome.family_id,
                    outcome.token_id,
                    client=client,
                    login_at=outcome.login_at,
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
        return self._pair(user, refresh, outcome.family_id)

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

    # --- proving the address, recovering the account ----------------------------------------------

    async def request_verification(self, user_id: uuid.UUID) -> None:
        """Queue a new verification mail (202); 409 when already proven, 429 past the address's limit."""
        user = await self.current_user(user_id)
        if user.email_verified:
            raise EmailAlreadyVerified()
        retry_after = await self.mail_limiter.reserve(VERIFY_EMAIL, user.email)
        if retry_after is not None:
            raise MailThrottled(retry_after)
        async with self.uow.transaction() as tx:
            await self.ownership.send_verification(tx, user)
        self.ownership.wake()

    async def verify_email(self, token: str) -> User:
        """Prove the address the token was mailed to: once; 400 unknown or used, 410 expired."""
        async with self.uow.transaction() as tx:
            taken = await tx.mail_tokens.take(hash_mail_token(token), VERIFY_EMAIL)
            if taken is Taken.EXPIRED:
                raise VerificationExpired()
            if isinstance(taken, Taken):
                raise VerificationInvalid()
            user = await tx.users.mark_verified(taken.user_id)
            if user is None or user.email.lower() != taken.email.lower():
                raise VerificationInvalid()  # the token proves the address it went to, nothing else
            await self.ownership.proven(tx, user.id)
        self.ownership.wake()
        log.info("email verified", extra={"user_id": str(user.id)})
        self.enrich_later(user)
        return user

    async def forgot_password(self, email: str) -> None:
        """Queue a reset mail when an account has `email`: the same answer, work and time either way."""
        retry_after = await self.mail_limiter.reserve(RESET_PASSWORD, email)
        if retry_after is not None:
            raise MailThrottled(retry_after)
        async with self.uow.transaction() as tx:
            await self.ownership.send_reset(tx, email)
        self.ownership.wake()

    async def reset_password(self, token: str, password: str, client: Client | None = None) -> Session:
        """Set a new password with a reset link (once): the address becomes proven, every other login is
        revoked, every reset link dies, and the account's login throttles are cleared; a new login."""
        digest = hash_mail_token(token)
        # Looked at before the costly hash, so garbage tokens cost no hashing; taken atomically after.
        async with self.uow.transaction() as tx:
            peeked = await tx.mail_tokens.peek(digest, RESET_PASSWORD)
        if peeked is Taken.EXPIRED:
            raise ResetExpired()
        if isinstance(peeked, Taken):
            raise ResetInvalid()
        password_hash = await self.hasher.hash(password)
        async with self.uow.transaction() as tx:
            taken = await tx.mail_tokens.take(digest, RESET_PASSWORD)
            if taken is Taken.EXPIRED:
                raise ResetExpired()
            if isinstance(taken, Taken):
                raise ResetInvalid()
            before = await tx.users.get(taken.user_id)
            if before is None:
                raise ResetInvalid()
            await tx.users.set_password_hash(before.id, password_hash)
            user = await tx.users.mark_verified(before.id)
            if user is None:
                raise ResetInvalid()
            await tx.mail_tokens.void(user.id, RESET_PASSWORD)
            await tx.refresh_tokens.revoke_all(user.id)
            if not before.email_verified:
                await self.ownership.proven(tx, user.id)
            tokens = await self._login(tx, user, client)
        self.ownership.wake()
        await self.throttle.clear(user.email)
        log.info("password reset", extra={"user_id": str(user.id)})
        if not before.email_verified:
            self.enrich_later(user)
        return Session(user, tokens)

    async def change_password(
        self,
        user_id: uuid.UUID,
        session_id: uuid.UUID | None,
        current_password: str,
        new_password: str,
        client_address: str,
    ) -> None:
        """Replace the password knowing the current one (a wrong one counts as a failed login); every
        other login is revoked and every reset link dies."""
        user = await self.current_user(user_id)
        retry_after = await self.throttle.reserve(user.email, client_address)
        if retry_after is not None:
            raise PasswordChangeThrottled(retry_after)
        try:
            credentials = await self.users.credentials(user.email)
            password_hash = credentials.password_hash if credentials is not None else None
            if password_hash is None:
                await self.hasher.verify_dummy(current_password)
            right = password_hash is not None and await self.hasher.verify(password_hash, current_password)
        except Exception:
            await self.throttle.undecided(user.email, client_address)
            raise
        if not right:
            raise WrongPassword()
        await self.throttle.succeeded(user.email, client_address)
        new_hash = await self.hasher.hash(new_password)
        async with self.uow.transaction() as tx:
            await tx.users.set_password_hash(user.id, new_hash)
            await tx.mail_tokens.void(user.id, RESET_PASSWORD)
            revoked = await tx.refresh_tokens.revoke_all(user.id, keep=session_id)
        log.info("password changed", extra={"user_id": str(user.id), "tokens_revoked": revoked})

    async def sign_out_everywhere(self, user_id: uuid.UUID) -> None:
        """Revoke every login of the user (their access tokens live on until they expire)."""
        revoked = await self.refresh_tokens.revoke_all(user_id)
        log.info("signed out everywhere", extra={"user_id": str(user_id), "tokens_revoked": revoked})

    # --- data rights: sessions and the export ------------------------------------------------------

    async def sessions(self, user_id: uuid.UUID, current: uuid.UUID | None) -> list[LoginSession]:
        """The user's live logins, the most recently used first; `current` (the asking token's `sid`)
        marks its own."""
        found = await self.refresh_tokens.live_sessions(user_id)
        return [replace(session, current=session.id == current) for session in found]

    async def end_session(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        """Revoke one of the user's live logins (its access tokens live on until they expire);
        SessionNotFound (404) when it is not one: unknown, ended, or another user's."""
        async with self.uow.transaction() as tx:
            ended = await tx.refresh_tokens.revoke_session(user_id, session_id)
        if not ended:
            raise SessionNotFound("You have no live session with this id.")
        log.info("session ended", extra={"user_id": str(user_id), "family_id": str(session_id)})

    async def export(self, user_id: uuid.UUID, current: uuid.UUID | None) -> DataExport:
        """Everything both services hold about the user, secrets left out; ReferralDataUnavailable
        (503) when the referral service cannot give its part (no partial export)."""
        user = await self.current_user(user_id)
        try:
            referral = await self.referral_exports.export_user(user.id)
        except ReferralServiceError as error:
            log.warning("data export: the referral service did not answer: %s", error)
            raise ReferralDataUnavailable(
                "The referral service did not answer, so the export would be incomplete; retry shortly."
            ) from None
        credentials = await self.users.credentials(user.email)
        return DataExport(
            exported_at=datetime.now(UTC),
            user=user,
            has_password=credentials is not None and credentials.password_hash is not None,
            identities=await self.identities.of_user(user.id),
            sessions=await self.sessions(user.id, current),
            referral=referral,
        )

    # --- erasure ------------------------------------------------------------------------------------

    async def erase_account(
        self,
        user_id: uuid.UUID,
        *,
        password: str | None,
        token_issued_at: int | None,
        client_address: str,
    ) -> None:
        """Erase the account (DELETE /me), after re-authentication.

        An account with a password needs it (403 `wrong_password`, counted as a failed login, 429 past
        the limit); one without needs an access token issued in the last `reauthentication_window`
        (403 `reauthentication_required`). Then, in one transaction, the user and everything personal
        of theirs go, the referral service's part is queued (re-keying the person to a random id there,
        so referrers keep their counts), and the subject is recorded as erased; after the commit the
        subject is denied on every process (its access tokens refused at once), and the referral
        service's part is delivered at once, else by the relay.
        """
        user = await self.current_user(user_id)
        credentials = await self.users.credentials(user.email)
        password_hash = credentials.password_hash if credentials is not None else None
        if password_hash is not None:
            if password is None:
                raise PasswordRequired()
            await self._check_password(user.email, password_hash, password, client_address)
        else:
            now = datetime.now(UTC).timestamp()
            if (
                token_issued_at is None
                or now - token_issued_at > self.reauthentication_window.total_seconds()
            ):
                raise ReauthenticationRequired()
        tokens_expire_at = datetime.now(UTC) + self.deny_for
        async with self.uow.transaction() as tx:
            erasure = await tx.erasures.erase(user.id, uuid.uuid4(), tokens_expire_at)
            if erasure is not None:
                await tx.events.publish(USER_DELETED, {"user_id": user.id})
        if erasure is None:
            raise UserGone()
        if self.deny_list is not None:
            await self.deny_list.deny(user.id, tokens_expire_at)
        await self.throttle.clear(user.email)
        log.warning("account erased", extra={"user_id": str(user.id)})
        if self.erasure_delivery is not None:
            await self.erasure_delivery.deliver_now(erasure)

    async def _check_password(
        self, email: str, password_hash: str, password: str, client_address: str
    ) -> None:
        """The password of a signed-in user's sensitive request: a wrong one is a failed login (403
        `wrong_password`), and past the login throttle's limit the request is refused unchecked (429)."""
        retry_after = await self.throttle.reserve(email, client_address)
        if retry_after is not None:
            raise PasswordChangeThrottled(retry_after)
        try:
            right = await self.hasher.verify(password_hash, password)
        except Exception:
            await self.throttle.undecided(email, client_address)
            raise
        if not right:
            raise WrongPassword()
        await self.throttle.succeeded(email, client_address)
