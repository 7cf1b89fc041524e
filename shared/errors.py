"""The one middleware that renders every error: problem+json (RFC 9457), or RFC 6749's body.

The errors themselves live in `shared.problems` (no web import there): a `Problem` carries its status
and stable `code`; an `OAuthError` is rendered in the RFC 6749 section 5.2 format instead.
Anything unexpected is logged with the request id and answered as a bare 500 revealing nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from shared.db import CheckViolation, DatabaseUnavailable
from shared.problems import OAuthError, Problem, ValidationProblem
from shared.responses import json_body, json_response

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:referral-system:problem:"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    errors: Mapping[str, list[str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Build the problem+json response every error path uses."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return web.Response(
        status=status, body=json_body(body), content_type=PROBLEM_JSON, charset="utf-8", headers=headers
    )


def oauth_error_response(error: OAuthError) -> web.Response:
    """The RFC 6749 section 5.2 body."""
    body = {"error": error.error, "error_description": error.description}
    return json_response(body, status=error.status, headers={**NO_STORE, **error.headers})


def _http_exception_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


_HTTP_TITLES = {
    404: "No such resource",
    405: "Method not allowed on this resource",
    413: "The request body is too large",
}


def render_http_exception(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404, 405, 413, ...) as problem+json, keeping headers such as Allow."""
    status = exc.status
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return problem_response(
        status,
        _http_exception_code(status),
        _HTTP_TITLES.get(status, phrase),
        exc.reason or phrase,
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where exceptions become responses."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(
            problem.status,
            problem.code,
            problem.title,
            problem.detail,
            errors=problem.errors,
            headers=problem.headers,
        )
    except OAuthError as error:
        return oauth_error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return render_http_exception(exc)
    except CheckViolation as violation:
        # Input the schemas let through but a CHECK constraint refused: still the client's input.
        log.warning("check constraint %s refused a write", violation.constraint)
        return problem_response(
            422,
            ValidationProblem.code,
            ValidationProblem.title,
            "A value is outside what is allowed.",
            errors={"_body": ["A value is outside what is allowed."]},
        )
    except DatabaseUnavailable as error:
        log.warning("database unavailable: %s", error)
        return problem_response(
            503,
            "database_unavailable",
            "The database is unavailable; retry shortly",
            "The database did not answer in time.",
            headers={"Retry-After": "1"},
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(
            500,
            "internal_error",
            "Internal server error",
            "The server could not complete the request; it has been logged.",
        )
