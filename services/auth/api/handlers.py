"""Handlers of the auth API: read validated input, call one use case, dump a response."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, querystring_schema, request_schema, response_schema
from multidict import MultiDictProxy

from services.auth.api.schemas import (
    AuthorizeQuerySchema,
    CallbackQuerySchema,
    ChangePasswordSchema,
    DataExportSchema,
    DiscoverySchema,
    EraseAccountSchema,
    ForgotPasswordSchema,
    JwksSchema,
    MailTokenSchema,
    MeSchema,
    OAuthErrorSchema,
    ProviderPathSchema,
    ResetPasswordSchema,
    SessionListSchema,
    SignupRequestSchema,
    SignupResponseSchema,
    TokenResponseSchema,
    UserSchema,
    VerifiedUserSchema,
)
from services.auth.appkeys import AUTH_SERVICE, KEY_RING, OAUTH_SERVICE, SETTINGS, TRUSTED_PROXIES
from services.auth.domain.errors import SessionNotFound, invalid_request
from services.auth.domain.models import (
    Client,
    DataExport,
    ExportedLink,
    LoginSession,
    Session,
    TokenPair,
)
from services.auth.domain.use_cases import required
from services.auth.settings import API_PREFIX
from shared.access import public
from shared.errors import NO_STORE
from shared.idempotency import fixed, idempotent
from shared.net import client_address
from shared.openapi import problem_responses
from shared.responses import json_response
from shared.tokens import CLAIMS

FORM = "application/x-www-form-urlencoded"
TAG = ["auth"]
OAUTH_TAG = "sign in with a provider"

_user_schema = UserSchema()
_token_schema = TokenResponseSchema()


def _oauth_errors(*statuses: int) -> dict[int, dict[str, Any]]:
    return {
        status: {
            "description": "RFC 6749 section 5.2 error",
            "content": {"application/json": {"schema": OAuthErrorSchema}},
        }
        for status in statuses
    }


def _throttled() -> dict[int, dict[str, Any]]:
    """429 on /token: the service's own login throttle answers in the RFC 6749 format, the gateway's
    rate limit as problem+json; both with Retry-After."""
    return {
        429: {
            "description": "Too many requests (Retry-After)",
            "content": {
                "application/json": {"schema": OAuthErrorSchema},
                **problem_responses(429)[429]["content"],
            },
        }
    }


def _form_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {FORM: {"schema": {"type": "object", "properties": properties, "required": required}}},
    }


async def _form(request: web.Request) -> dict[str, str]:
    """The form parameters; RFC 6749 section 3.2 forbids repeating one."""
    if request.content_type != FORM:
        raise invalid_request(f"send the parameters as {FORM}")
    try:
        form: MultiDictProxy[Any] = await request.post()
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the form body cannot be decoded") from None
    params: dict[str, str] = {}
    for key in set(form.keys()):
        values = form.getall(key)
        if len(values) > 1:
            raise invalid_request(f"parameter {key!r} is repeated")
        if not isinstance(values[0], str):
            raise invalid_request(f"parameter {key!r} must be text")
        params[key] = values[0]
    return params


def _client(request: web.Request) -> Client:
    """The client a login records: its User-Agent and its address (trusted-proxy aware)."""
    return Client.of(request.headers.get("User-Agent"), client_address(request, request.app[TRUSTED_PROXIES]))


def _token_response(tokens: TokenPair) -> web.Response:
    body = {
        "access_token": tokens.access_token,
        "token_type": tokens.token_type,
        "expires_in": tokens.expires_in,
        "refresh_token": tokens.refresh_token,
    }
    return json_response(_token_schema.dump(body), headers=NO_STORE)


@idempotent(fixed("signup"))
@docs(
    tags=TAG,
    summary="Sign up with email and password",
    description=(
        "Creates the user and signs them in. With `referral_code`, the code is checked first: an "
        "unknown code answers 404 `code_not_found`, an expired or deleted one 410 `code_expired`, one "
        "whose `max_uses` are all taken 409 `code_exhausted`, and when the referral service cannot be "
        "asked, 503 `referral_service_unavailable` with Retry-After; no user is created in those "
        "cases. The check takes one use of the code for the new user before the user is created (and "
        "gives it back if the signup fails), so `max_uses` holds under any concurrency and a signup "
        "accepted with the last use keeps it: when a signup and an activation race for the last use, "
        "whichever the referral service serves first (the code's row lock) gets it, and the other "
        "answers 409 `code_exhausted`. A valid code makes its owner the new "
        "user's `referrer_id`, and the referral is recorded with the referral service; an address that "
        "is the code owner's own under another spelling (case, dots of a Gmail or Googlemail local "
        "part, a `+tag` on any domain) answers 422 `self_referral`. An address of a disposable-mail "
        "domain (a maintained list, subdomains included; `AUTH_BLOCK_DISPOSABLE=false` turns this "
        "off) answers 422 `email_undeliverable`, with or without an email verifier. When an email "
        "verifier is configured, an address it judges invalid or disposable answers 422 "
        "`email_undeliverable` too; nothing is created in those cases. If the verifier cannot "
        "answer, the signup goes on and its verdict (or `unchecked`) shows as `email_check` on "
        "`/me`. Profile enrichment, when configured, runs after the answer and fills `profile` on "
        "`/me` later. The gateway limits how often one client may sign up (429 with Retry-After)."
    ),
    responses=problem_responses(400, 404, 409, 410, 413, 415, 422, 429, 503),
)
@request_schema(SignupRequestSchema)
@response_schema(SignupResponseSchema, 201, description="The new user, signed in")
@public
async def signup(request: web.Request) -> web.Response:
    data = request["data"]
    session = await request.app[AUTH_SERVICE].signup(
        data["email"], data["password"], data["referral_code"], _client(request)
    )
    return _session_response(session, status=201)


def _session_response(session: Session, *, status: int) -> web.Response:
    """The body of signup and of a provider callback: the user and their tokens."""
    body = {
        "user": _user_schema.dump(session.user),
        "access_token": session.tokens.access_token,
        "refresh_token": session.tokens.refresh_token,
        "token_type": session.tokens.token_type,
        "expires_in": session.tokens.expires_in,
    }
    return json_response(body, status=status, headers=NO_STORE)


@docs(
    tags=TAG,
    summary="OAuth2 token endpoint (password and refresh_token grants)",
    description=(
        "RFC 6749 sections 4.3 and 6. Refresh tokens rotate on every use; presenting a rotated one "
        "revokes every token of its login. Repeated failed logins answer 429 with Retry-After."
    ),
    requestBody=_form_body(
        {
            "grant_type": {"type": "string", "enum": ["password", "refresh_token"]},
            "username": {"type": "string", "minLength": 1, "description": "the email (password grant)"},
            "password": {
                "type": "string",
                "minLength": 1,
                "format": "password",
                "description": "(password grant)",
            },
            "refresh_token": {"type": "string", "minLength": 1, "description": "(refresh_token grant)"},
            "scope": {"type": "string", "description": "ignored"},
        },
        ["grant_type"],
    ),
    responses={**_oauth_errors(400), **_throttled(), **problem_responses(413)},
)
@response_schema(TokenResponseSchema, 200, description="Tokens (Cache-Control: no-store)")
@public
async def token(request: web.Request) -> web.Response:
    params = await _form(request)
    address = client_address(request, request.app[TRUSTED_PROXIES])
    user_agent = request.headers.get("User-Agent")
    return _token_response(await request.app[AUTH_SERVICE].token(params, address, user_agent=user_agent))


@docs(
    tags=TAG,
    summary="Revoke a refresh token (RFC 7009)",
    description="Revokes the token and every token of the same login. Unknown tokens also answer 200.",
    requestBody=_form_body(
        {"token": {"type": "string", "minLength": 1}, "token_type_hint": {"type": "string"}}, ["token"]
    ),
    responses={200: {"description": "Revoked (or unknown)"}, **_oauth_errors(400), **problem_responses(413)},
)
@public
async def revoke(request: web.Request) -> web.Response:
    params = await _form(request)
    await request.app[AUTH_SERVICE].revoke(required(params, "token"))
    return web.Response(status=200, headers=NO_STORE)


@docs(
    tags=TAG,
    summary="The current user",
    responses=problem_responses(401),
)
@response_schema(MeSchema, 200, description="The bearer's account")
async def me(request: web.Request) -> web.Response:
    user = await request.app[AUTH_SERVICE].current_user(request[CLAIMS].user_id)
    # MeSchema's shape, built directly: a marshmallow dump costs more than the rest of the handler.
    return json_response(
        {
            "id": str(user.id),
            "email": user.email,
            "email_verified": user.email_verified,
            "created_at": user.created_at.isoformat(),
            "referrer_id": str(user.referrer_id) if user.referrer_id else None,
            "email_check": user.email_check,
            "profile": user.profile,
        }
    )


@docs(tags=TAG, summary="Public keys that verify access tokens (RFC 7517)")
@response_schema(JwksSchema, 200, description="JWKS")
@public
async def jwks(request: web.Request) -> web.Response:
    return json_response(request.app[KEY_RING].jwks(), headers={"Cache-Control": "public, max-age=300"})


@docs(tags=TAG, summary="Authorization server metadata (discovery)")
@response_schema(DiscoverySchema, 200, description="Discovery document")
@public
async def discovery(request: web.Request) -> web.Response:
    issuer = request.app[SETTINGS].issuer
    body = {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "token_endpoint": f"{issuer}/token",
        "revocation_endpoint": f"{issuer}/revoke",
        "grant_types_supported": ["password", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "sign_in_providers": [
            {"name": p.name, "kind": p.kind, "authorization_endpoint": f"{issuer}/oauth/{p.name}/authorize"}
            for p in request.app[SETTINGS].oauth
        ],
    }
    return json_response(body, headers={"Cache-Control": "public, max-age=300"})


@docs(
    tags=[OAUTH_TAG],
    summary="Sign up or in with an external provider: go to the provider",
    description=(
        "Redirects (302) to the provider's consent page with a random `state`, PKCE (S256) and, for "
        "OpenID Connect, a `nonce`. A `referral_code` is carried through `state` and applied exactly "
        "as in password signup if the sign-in creates the account. The flow must be completed within "
        "`AUTH_OAUTH_STATE_TTL` seconds, once."
    ),
    responses={
        302: {
            "description": "To the provider (Cache-Control: no-store)",
            "headers": {
                "Location": {
                    "description": "the provider's authorization endpoint, with this sign-in's parameters",
                    "schema": {"type": "string", "format": "uri"},
                }
            },
        },
        **problem_responses(404, 422, 503),
    },
)
@match_info_schema(ProviderPathSchema, put_into="path")
@querystring_schema(AuthorizeQuerySchema)
@public
async def oauth_authorize(request: web.Request) -> web.Response:
    url = await request.app[OAUTH_SERVICE].begin(
        request["path"]["provider"], request["querystring"]["referral_code"]
    )
    return web.Response(status=302, headers={"Location": url, **NO_STORE})


@docs(
    tags=[OAUTH_TAG],
    summary="Where the provider sends the user back: finish the sign-in",
    description=(
        "201 with the signup body for a new user, 200 for a returning one (or one whose existing "
        "account was linked: only when the provider says the email is verified; otherwise 409 "
        "`email_taken`). 400 `invalid_state` for a missing, unknown, expired or reused state; 400 "
        "`oauth_failed` when the provider refused or failed (denied consent, code exchange error, "
        "provider down, bad ID token). A referral code carried in the state answers like signup: 404 "
        "`code_not_found`, 410 `code_expired`, 409 `code_exhausted`, 503. Nothing is created on any "
        "failure."
    ),
    responses=problem_responses(400, 404, 409, 410, 422, 503),
)
@match_info_schema(ProviderPathSchema, put_into="path")
@querystring_schema(CallbackQuerySchema)
@response_schema(SignupResponseSchema, 201, description="A new user, signed in")
@response_schema(SignupResponseSchema, 200, description="A returning user, signed in")
@public
async def oauth_callback(request: web.Request) -> web.Response:
    query = request["querystring"]
    result = await request.app[OAUTH_SERVICE].finish(
        request["path"]["provider"],
        code=query["code"],
        state=query["state"],
        error=query["error"],
        client=_client(request),
    )
    return _session_response(result.session, status=201 if result.created else 200)


ACCEPTED = 202


@docs(
    tags=TAG,
    summary="Mail me a new verification link",
    description=(
        "Queues a mail with a link that proves the bearer owns their address (valid 24 hours by "
        "default). At most one mail of each kind a minute, and 10 a day, go to one address (429 with "
        "Retry-After); the gateway limits each client too. 409 `email_already_verified` when proven."
    ),
    responses={ACCEPTED: {"description": "The mail is queued"}, **problem_responses(401, 409, 429)},
)
async def request_verification(request: web.Request) -> web.Response:
    await request.app[AUTH_SERVICE].request_verification(request[CLAIMS].user_id)
    return web.Response(status=ACCEPTED)


@docs(
    tags=TAG,
    summary="Prove an address with the token of its verification mail",
    description=(
        "The token is single use. 400 `verification_invalid` for an unknown or used token, 410 "
        "`verification_expired` for an expired one. A proven address unlocks referral codes and "
        "enrichment, and confirms the user's pending referral link."
    ),
    responses=problem_responses(400, 410, 413, 415, 422),
)
@request_schema(MailTokenSchema)
@response_schema(VerifiedUserSchema, 200, description="The user, with email_verified true")
@public
async def verify_email(request: web.Request) -> web.Response:
    user = await request.app[AUTH_SERVICE].verify_email(request["data"]["token"])
    return json_response({"user": _user_schema.dump(user)}, headers=NO_STORE)


@docs(
    tags=TAG,
    summary="Mail me a password reset link",
    description=(
        "Always 202, in the same time, whether or not an account has this address; when one does "
        "(also one without a password, made through a provider), a reset link valid 30 minutes by "
        "default is mailed, and older reset links stop working. Limited per address like the "
        "verification mail (429) and per client by the gateway."
    ),
    responses={ACCEPTED: {"description": "Accepted"}, **problem_responses(400, 413, 415, 422, 429)},
)
@request_schema(ForgotPasswordSchema)
@public
async def forgot_password(request: web.Request) -> web.Response:
    await request.app[AUTH_SERVICE].forgot_password(request["data"]["email"])
    return web.Response(status=ACCEPTED)


@docs(
    tags=TAG,
    summary="Set a new password with the token of a reset mail",
    description=(
        "Answers like signup: the user and a new login. The address becomes proven (the mail reached "
        "its owner), every other login of the user is revoked, every reset link dies, and the "
        "account's login throttles are cleared. 400 `reset_invalid` for an unknown, used or replaced "
        "token, 410 `reset_expired` for an expired one."
    ),
    responses=problem_responses(400, 410, 413, 415, 422),
)
@request_schema(ResetPasswordSchema)
@response_schema(SignupResponseSchema, 200, description="The user, signed in anew")
@public
async def reset_password(request: web.Request) -> web.Response:
    data = request["data"]
    session = await request.app[AUTH_SERVICE].reset_password(
        data["token"], data["password"], _client(request)
    )
    return _session_response(session, status=200)


@docs(
    tags=TAG,
    summary="Change my password",
    description=(
        "Needs the current password: a wrong one answers 403 `wrong_password` and counts as a failed "
        "login of this account from this address (429 past the limit). Every other login of the user "
        "is revoked (the caller's stays), and every reset link dies."
    ),
    responses={204: {"description": "Changed"}, **problem_responses(400, 401, 403, 413, 415, 422, 429)},
)
@request_schema(ChangePasswordSchema)
async def change_password(request: web.Request) -> web.Response:
    data, claims = request["data"], request[CLAIMS]
    await request.app[AUTH_SERVICE].change_password(
        claims.user_id,
        claims.session_id,
        data["current_password"],
        data["new_password"],
        client_address(request, request.app[TRUSTED_PROXIES]),
    )
    return web.Response(status=204)


@docs(
    tags=TAG,
    summary="Sign out everywhere",
    description="Revokes every refresh token of the user; access tokens end at their expiry.",
    responses={204: {"description": "Signed out"}, **problem_responses(401)},
)
async def sign_out_everywhere(request: web.Request) -> web.Response:
    await request.app[AUTH_SERVICE].sign_out_everywhere(request[CLAIMS].user_id)
    return web.Response(status=204)


def _session_body(session: LoginSession) -> dict[str, object]:
    return {
        "id": str(session.id),
        "created_at": session.created_at.isoformat(),
        "last_used_at": session.last_used_at.isoformat(),
        "user_agent": session.user_agent,
        "address": session.address,
        "current": session.current,
    }


SESSION_FIELDS = (
    "A session is one login (password, signup, provider sign-in or password reset) with the refresh "
    "tokens it has rotated through; its `id` is the `sid` claim of its access tokens, and `current` "
    "marks the session of the token that asks (a token without `sid` has none). `user_agent` and "
    "`address` are those of the login, then of each refresh: they say where the session was last used "
    "from. `Cache-Control: no-store`."
)


@docs(
    tags=TAG,
    summary="My live sessions",
    description=(
        "Every login of mine that can still refresh (not revoked, not expired, not ended by reuse of a "
        "rotated token), the most recently used first. " + SESSION_FIELDS
    ),
    responses=problem_responses(401),
)
@response_schema(SessionListSchema, 200, description="The live sessions")
async def list_sessions(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    sessions = await request.app[AUTH_SERVICE].sessions(claims.user_id, claims.session_id)
    return json_response({"items": [_session_body(s) for s in sessions]}, headers=NO_STORE)


@docs(
    tags=TAG,
    summary="End one of my sessions",
    description=(
        "Revokes every refresh token of that login, also one a refresh is issuing at this moment: its "
        "refresh token then answers `invalid_grant`; its access tokens live on until they expire (15 "
        "minutes by default). Ending the caller's own session is allowed. 404 `session_not_found` for "
        "an id that is not one of the caller's live sessions: unknown, already ended, another user's, "
        "or not a UUID at all (no session has such an id, so it is not a validation error)."
    ),
    parameters=[
        {
            "in": "path",
            "name": "session_id",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
            "description": "the session's `id` (from the list)",
        }
    ],
    responses={204: {"description": "Ended"}, **problem_responses(401, 404)},
)
async def end_session(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    try:
        session_id = uuid.UUID(request.match_info["session_id"])
    except ValueError:
        raise SessionNotFound("You have no live session with this id.") from None
    await request.app[AUTH_SERVICE].end_session(claims.user_id, session_id)
    return web.Response(status=204, headers=NO_STORE)


def _link_body(link: ExportedLink) -> dict[str, object]:
    return {
        "referrer_id": str(link.referrer_id),
        "referral_id": str(link.referral_id),
        "email": link.email,
        "code": link.code,
        "status": link.status,
        "created_at": link.created_at.isoformat(),
        "confirmed_at": link.confirmed_at.isoformat() if link.confirmed_at else None,
    }


def _export_body(export: DataExport) -> dict[str, object]:
    user, referral = export.user, export.referral
    verified_at = referral.email_verified_at
    return {
        "exported_at": export.exported_at.isoformat(),
        "account": {
            "id": str(user.id),
            "email": user.email,
            "email_verified": user.email_verified,
            "created_at": user.created_at.isoformat(),
            "referrer_id": str(user.referrer_id) if user.referrer_id else None,
            "has_password": export.has_password,
            "email_verified_at": verified_at.isoformat() if verified_at else None,
        },
        "identities": [
            {
                "provider": identity.provider,
                "subject": identity.subject,
                "email": identity.email,
                "created_at": identity.created_at.isoformat(),
            }
            for identity in export.identities
        ],
        "email_check": user.email_check,
        "profile": user.profile,
        "sessions": [_session_body(s) for s in export.sessions],
        "codes": [
            {
                "code": code.code,
                "status": code.status,
                "created_at": code.created_at.isoformat(),
                "expires_at": code.expires_at.isoformat(),
                "deleted_at": code.deleted_at.isoformat() if code.deleted_at else None,
                "max_uses": code.max_uses,
                "uses": code.uses,
            }
            for code in referral.codes
        ],
        "referrer": _link_body(referral.referrer) if referral.referrer else None,
        "referrals": [_link_body(link) for link in referral.referrals],
    }


@docs(
    tags=TAG,
    summary="Export everything held about me",
    description=(
        "One JSON document with what both services hold about the caller: the account (no password "
        "or hash: only whether there is one), the linked provider identities, the email check, the "
        "enriched profile, the live sessions, and from the referral service every referral code the "
        "caller ever had (deleted and expired ones too, with `uses` and `max_uses`), the caller's own "
        "link (`referrer`: who referred them) and the links of the users they referred (emails "
        "unmasked). No token, digest or mailed link is in it. When the referral service cannot answer, "
        "503 `referral_service_unavailable` with Retry-After: no partial export. "
        "`Cache-Control: no-store`."
    ),
    responses=problem_responses(401, 503),
)
@response_schema(DataExportSchema, 200, description="The export")
async def export_me(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    export = await request.app[AUTH_SERVICE].export(claims.user_id, claims.session_id)
    return json_response(_export_body(export), headers=NO_STORE)


@docs(
    tags=TAG,
    summary="Erase my account",
    description=(
        "Removes the account and everything personal of it: every login, identities, mailed tokens "
        "and pending mails, the email check and profile. The referral service's part follows over an "
        "outbox (so it completes even when that service is down now): the user's codes are deleted "
        "(their texts are never issued again) and the person is removed from every link, while "
        "referrers keep their counts. Both services refuse the user's access tokens from the 204 on "
        "(401), on every instance.\n\n"
        "Re-authentication: JSON `{password}` for an account with a password (a wrong one answers 403 "
        "`wrong_password` and counts as a failed login of this account from this address, 429 past the "
        "limit; a missing one 422). An account without a password (provider sign-in only) sends `{}` "
        "with an access token issued in the last 5 minutes, else 403 `reauthentication_required`."
    ),
    responses={204: {"description": "Erased"}, **problem_responses(400, 401, 403, 413, 415, 422, 429)},
)
@request_schema(EraseAccountSchema)
async def erase_account(request: web.Request) -> web.Response:
    data, claims = request["data"], request[CLAIMS]
    issued_at = claims.raw.get("iat")
    await request.app[AUTH_SERVICE].erase_account(
        claims.user_id,
        password=data.get("password"),
        token_issued_at=int(issued_at) if isinstance(issued_at, int | float) else None,
        client_address=client_address(request, request.app[TRUSTED_PROXIES]),
    )
    return web.Response(status=204)


PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"
# The pages mail links open (API.md): static files, read once; their script is a file of its own, so the
# gateway's Content-Security-Policy needs no inline script for them.
_PAGES = {
    "verify-email": ("verify-email.html", "text/html"),
    "reset-password": ("reset-password.html", "text/html"),
    "pages.js": ("pages.js", "text/javascript"),
    "pages.css": ("pages.css", "text/css"),
}
_PAGE_BODIES = {name: ((PAGES_DIR / file).read_bytes(), kind) for name, (file, kind) in _PAGES.items()}


@public
async def page(request: web.Request) -> web.Response:
    """A mailed link's page (or its script or style); 404 for anything else."""
    found = _PAGE_BODIES.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, kind = found
    return web.Response(body=body, content_type=kind, charset="utf-8", headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    """Every public route under /api/v1/auth."""
    app.router.add_post(f"{API_PREFIX}/signup", signup)
    app.router.add_post(f"{API_PREFIX}/token", token)
    app.router.add_post(f"{API_PREFIX}/revoke", revoke)
    app.router.add_get(f"{API_PREFIX}/me", me)
    app.router.add_delete(f"{API_PREFIX}/me", erase_account)
    app.router.add_get(f"{API_PREFIX}/.well-known/jwks.json", jwks)
    app.router.add_get(f"{API_PREFIX}/.well-known/openid-configuration", discovery)
    app.router.add_get(f"{API_PREFIX}/oauth/{{provider}}/authorize", oauth_authorize)
    app.router.add_get(f"{API_PREFIX}/oauth/{{provider}}/callback", oauth_callback)
    app.router.add_post(f"{API_PREFIX}/email/verification", request_verification)
    app.router.add_post(f"{API_PREFIX}/email/verify", verify_email)
    app.router.add_post(f"{API_PREFIX}/password/forgot", forgot_password)
    app.router.add_post(f"{API_PREFIX}/password/reset", reset_password)
    app.router.add_post(f"{API_PREFIX}/password/change", change_password)
    app.router.add_delete(f"{API_PREFIX}/sessions", sign_out_everywhere)
    app.router.add_get(f"{API_PREFIX}/sessions", list_sessions)
    # `[^/]+`: any segment reaches the handler, which answers 404 for one that is not a session id.
    app.router.add_delete(f"{API_PREFIX}/sessions/{{session_id:[^/]+}}", end_session)
    app.router.add_get(f"{API_PREFIX}/me/export", export_me)
    app.router.add_get(f"{API_PREFIX}/pages/{{name}}", page)
