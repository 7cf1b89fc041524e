"""The errors a use case may raise, with their HTTP status and stable `code`, and nothing of the web.

Domain errors subclass `Problem`; the OAuth2 endpoints raise `OAuthError`. `shared.errors` renders
both. Importing this module loads no web framework, driver or client, so a domain can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class Problem(Exception):
    """An error answered as problem+json; subclasses set `status`, `code` and `title`."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: Mapping[str, list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = errors
        self.headers = dict(headers or {})


class ValidationProblem(Problem):
    status = 422
    code = "validation_failed"
    title = "The request is not valid"


class MalformedJson(Problem):
    status = 400
    code = "malformed_json"
    title = "The body is not well-formed JSON"


class UnsupportedMediaType(Problem):
    status = 415
    code = "unsupported_media_type"
    title = "The body must be application/json"


class InvalidToken(Problem):
    status = 401
    code = "invalid_token"
    title = "A valid bearer token is required"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": _bearer_challenge("invalid_token", detail)})


class MissingToken(Problem):
    status = 401
    code = "invalid_token"
    title = "A valid bearer token is required"

    def __init__(self) -> None:
        # RFC 6750 section 3.1: a request without credentials gets a challenge without an error code,
        # but API.md asks for invalid_token in every 401.
        super().__init__(headers={"WWW-Authenticate": _bearer_challenge("invalid_token", "missing token")})


class InsufficientScope(Problem):
    status = 403
    code = "insufficient_scope"
    title = "The token does not allow this request"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(
            detail, headers={"WWW-Authenticate": _bearer_challenge("insufficient_scope", detail)}
        )


class ServiceUnavailable(Problem):
    status = 503
    code = "service_unavailable"
    title = "A backing service is unavailable; retry shortly"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


def _bearer_challenge(error: str, description: str | None) -> str:
    challenge = f'Bearer error="{error}"'
    if description:
        safe = description.replace("\\", "").replace('"', "'")
        challenge += f', error_description="{safe}"'
    return challenge


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error: `{"error", "error_description"}`, never cached."""

    def __init__(
        self, error: str, description: str, *, status: int = 400, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})
