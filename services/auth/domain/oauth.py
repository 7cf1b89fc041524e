"""Use cases of signing in through an external provider: the authorization-code flow with PKCE.

`begin` keeps the flow (PKCE verifier, nonce, referral code) in Redis under a random `state`, so any
replica can finish it, and sends the user to the provider. `finish` takes the state back exactly
once, has the provider exchange the code (checking the ID token), and then finds the user by
(provider, subject); a new subject whose email already has an account is linked to it only when
the provider vouches for the email (and when that account's address was never proven, the provider's
proof wins: `AuthService.take_over`); otherwise a new user is created, exactly as a password signup
would (referral code, email check), but without a password, proven when the provider vouches.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.auth.domain.errors import (
    EmailTaken,
    IdentityAlreadyLinked,
    InvalidState,
    OAuthFailed,
    ProviderError,
    SignInUnavailable,
    StateStoreUnavailable,
    UnknownProvider,
)
from services.auth.domain.models import Client, ProviderIdentity, Session, User
from services.auth.domain.ports import IdentityProvider, OAuthStateStore
from services.auth.domain.use_cases import AuthService

log = logging.getLogger(__name__)

# RFC 6749 error codes are printable ASCII without quotes or backslashes; anything else is not echoed.
_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}")


@dataclass(frozen=True)
class ProviderSignIn:
    """A user signed in through a provider; `created` when this sign-in made their account."""

    session: Session
    created: bool


@dataclass
class OAuthService:
    """Provider sign-in, with its collaborators."""

    auth: AuthService
    providers: Mapping[str, IdentityProvider]
    states: OAuthStateStore
    redirect_uri: Callable[[str], str]

    def _provider(self, name: str) -> IdentityProvider:
        provider = self.providers.get(name)
        if provider is None:
            raise UnknownProvider(f"No sign-in provider is configured under the name {name!r}.")
        return provider

    async def begin(self, name: str, referral_code: str | None) -> str:
        """The provider's authorization URL for a new flow (state, PKCE S256, nonce)."""
        provider = self._provider(name)
        try:
            flow = await self.states.create(name, referral_code=referral_code)
        except StateStoreUnavailable:
            raise SignInUnavailable("The sign-in flow cannot be stored right now.") from None
        try:
            return await provider.authorization_url(
                redirect_uri=self.redirect_uri(name),
                state=flow.state,
                code_challenge=flow.code_challenge,
                nonce=flow.nonce,
            )
        except ProviderError as error:
            log.warning("provider %s unavailable at authorize: %s", name, error.reason)
            raise OAuthFailed("The provider cannot be reached; try again later.") from None

    async def finish(
        self,
        name: str,
        *,
        code: str | None,
        state: str | None,
        error: str | None,
        client: Client | None = None,
    ) -> ProviderSignIn:
        """Complete the flow the provider sent the user back from; nothing is created on failure.

        The login it makes records `client` (User-Agent, address) as its session's.
        """
        provider = self._provider(name)
        if error:
            # Denied consent and the like: some providers leave `state` out of an error answer; when
            # it is there, the flow is spent all the same.
            if state:
                with contextlib.suppress(StateStoreUnavailable):
                    await self.states.consume(state)
            said = error if _ERROR_CODE.fullmatch(error) else "an error"
            raise OAuthFailed(f"The provider answered {said}; nothing was created.")
        if not state:
            raise InvalidState("The callback carries no state.")
        try:
            flow = await self.states.consume(state)
        except StateStoreUnavailable:
            raise SignInUnavailable("The sign-in flow cannot be read right now.") from None
        if flow is None or flow.provider != name:
            raise InvalidState()
        if not code:
            raise OAuthFailed("The callback carries no code.")
        try:
            identity = await provider.exchange(
                code=code,
                redirect_uri=self.redirect_uri(name),
                code_verifier=flow.code_verifier,
                nonce=flow.nonce,
            )
        except ProviderError as failure:
            log.warning("sign-in with %s failed: %s", name, failure.reason)
            raise OAuthFailed(f"The sign-in with {name} failed: {failure.reason}.") from None

        user_id = await self.auth.identities.user_for(name, identity.subject)
        if user_id is not None:
            user = await self.auth.current_user(user_id)
            return ProviderSignIn(await self.auth.sign_in(user, client=client), created=False)

        existing = await self.auth.users.credentials(identity.email)
        if existing is not None:
            return await self._link(name, identity, existing.user, client)

        user_id = uuid.uuid4()
        referral = (
            await self.auth.reserve_referral_code(flow.referral_code, user_id) if flow.referral_code else None
        )
        try:
            if referral is not None:
                await self.auth.refuse_self_referral(referral, identity.email)
            email_check = await self.auth.check_email(identity.email)
        except BaseException:
            await self.auth.release_referral_code(referral, user_id)
            raise
        try:
            session = await self.auth.register(
                identity.email,
                password_hash=None,
                code=referral,
                email_check=email_check,
                identity=(name, identity.subject),
                email_verified=identity.email_verified,
                user_id=user_id,
                client=client,
            )
        except IdentityAlreadyLinked:
            raise OAuthFailed("This provider account was linked at the same moment; sign in again.") from None
        return ProviderSignIn(session, created=True)

    async def _link(
        self, name: str, identity: ProviderIdentity, user: User, client: Client | None
    ) -> ProviderSignIn:
        """A new provider identity whose email has an account: linked only when the provider vouches."""
        if not identity.email_verified:
            # An email the provider does not vouch for never links to, or matches, an account.
            raise EmailTaken(
                "An account with this email exists, and the provider does not vouch for the email,"
                " so the sign-in cannot be linked to it."
            )
        try:
            if user.email_verified:
                session = await self.auth.sign_in(user, link_identity=(name, identity.subject), client=client)
            else:
                # The provider's proof wins over an unproven account: whoever squatted it loses it.
                session = await self.auth.take_over(
                    user, provider=name, subject=identity.subject, client=client
                )
        except IdentityAlreadyLinked:
            raise OAuthFailed("This provider account was linked at the same moment; sign in again.") from None
        log.info("provider identity linked", extra={"user_id": str(user.id), "provider": name})
        return ProviderSignIn(session, created=False)
