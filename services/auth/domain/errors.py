"""Domain errors: problem+json ones carry status and code; OAuth2 ones use RFC 6749 names. Then the
failures the ports report (plain exceptions: the use cases decide what they mean)."""

from __future__ import annotations

from shared.problems import OAuthError, Problem


class EmailTaken(Problem):
    status = 409
    code = "email_taken"
    title = "An account with this email already exists"


class EmailUndeliverable(Problem):
    status = 422
    code = "email_undeliverable"
    title = "The email address cannot receive mail"

    def __init__(self, detail: str | None = None) -> None:
        detail = detail or "The email verifier says this address is invalid or disposable."
        super().__init__(detail, errors={"email": [detail]})


class ReferralCodeNotFound(Problem):
    status = 404
    code = "code_not_found"
    title = "No such referral code"


class ReferralCodeExpired(Problem):
    status = 410
    code = "code_expired"
    title = "The referral code has expired or was deleted"


class ReferralCodeExhausted(Problem):
    status = 409
    code = "code_exhausted"
    title = "The referral code has been used as many times as it allows"


class SelfReferral(Problem):
    status = 422
    code = "self_referral"
    title = "You cannot use your own referral code"


class ReferralServiceUnavailable(Problem):
    status = 503
    code = "referral_service_unavailable"
    title = "The referral code cannot be checked right now; retry shortly"

    def __init__(self, detail: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class ReferralDataUnavailable(ReferralServiceUnavailable):
    """The data export needs the referral service's part, and it cannot answer (the same stable code)."""

    title = "The referral service cannot answer right now; retry shortly"


class SessionNotFound(Problem):
    status = 404
    code = "session_not_found"
    title = "No such session"


class UnknownProvider(Problem):
    status = 404
    code = "unknown_provider"
    title = "No such sign-in provider"


class InvalidState(Problem):
    status = 400
    code = "invalid_state"
    title = "The sign-in flow is unknown, expired or already used; start again"


class OAuthFailed(Problem):
    status = 400
    code = "oauth_failed"
    title = "The sign-in with the provider failed; nothing was created"


class SignInUnavailable(Problem):
    status = 503
    code = "sign_in_unavailable"
    title = "Provider sign-in is unavailable right now; retry shortly"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class UserGone(Problem):
    status = 401
    code = "invalid_token"
    title = "The token's user no longer exists"


def invalid_grant(description: str) -> OAuthError:
    return OAuthError("invalid_grant", description)


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def unsupported_grant_type(grant_type: str) -> OAuthError:
    return OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")


def login_throttled(retry_after: int) -> OAuthError:
    return OAuthError(
        "temporarily_unavailable",
        f"too many failed login attempts; retry in {retry_after} seconds",
        status=429,
        headers={"Retry-After": str(retry_after)},
    )


class EmailAlreadyVerified(Problem):
    status = 409
    code = "email_already_verified"
    title = "This email address is already verified"


class VerificationInvalid(Problem):
    status = 400
    code = "verification_invalid"
    title = "This verification link is unknown or was already used"


class VerificationExpired(Problem):
    status = 410
    code = "verification_expired"
    title = "This verification link has expired; ask for a new one"


class ResetInvalid(Problem):
    status = 400
    code = "reset_invalid"
    title = "This password reset link is unknown, was already used or was replaced"


class ResetExpired(Problem):
    status = 410
    code = "reset_expired"
    title = "This password reset link has expired; ask for a new one"


class WrongPassword(Problem):
    status = 403
    code = "wrong_password"
    title = "The current password is not right"


class ReauthenticationRequired(Problem):
    status = 403
    code = "reauthentication_required"
    title = "Sign in again: this needs an access token issued in the last 5 minutes"


class PasswordRequired(Problem):
    status = 422
    code = "validation_failed"
    title = "The request is not valid"

    def __init__(self) -> None:
        detail = "An account with a password is erased only with its password."
        super().__init__(detail, errors={"password": [detail]})


class PasswordChangeThrottled(Problem):
    status = 429
    code = "too_many_requests"
    title = "Too many wrong passwords; retry later"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"Too many wrong passwords for this account from this address; retry in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )


class MailThrottled(Problem):
    status = 429
    code = "too_many_mails"
    title = "Too many mails to this address; retry later"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"At most one mail of this kind a minute, and 10 a day, go to one address; retry in {retry_after}"
            " seconds.",
            headers={"Retry-After": str(retry_after)},
        )


# --- what the ports report -------------------------------------------------------------------------


class EmailAlreadyUsed(Exception):
    """The user store refused a second account with this address (its unique index)."""


class IdentityAlreadyLinked(Exception):
    """This provider's subject is already linked to a user (the identity store refused it)."""

    def __init__(self, provider: str, subject: str) -> None:
        super().__init__(f"{provider} identity already linked")
        self.provider = provider
        self.subject = subject


class UnknownCode(Exception):
    """The referral service knows no such code."""


class InactiveCode(Exception):
    """The code exists but has expired or was deleted."""


class ExhaustedCode(Exception):
    """The code is active but has no use left (its `max_uses`)."""


class ReferralServiceError(Exception):
    """The call failed in a way that may pass: unreachable, timeout, 5xx, refused token, odd answer.

    The message is short and holds no secrets; it is stored as the outbox row's `last_error`.
    """


class ProviderError(Exception):
    """The sign-in could not be completed at the provider; `reason` is short and secret-free."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StateStoreUnavailable(Exception):
    """The sign-in state store could not be asked: the flow cannot start or finish now."""
