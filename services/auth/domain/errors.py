"""Domain errors: problem+json ones carry status and code; OAuth2 ones use RFC 6749 names."""

from __future__ import annotations

from shared.errors import OAuthError, Problem


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


class ReferralServiceUnavailable(Problem):
    status = 503
    code = "referral_service_unavailable"
    title = "The referral code cannot be checked right now; retry shortly"

    def __init__(self, detail: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


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
