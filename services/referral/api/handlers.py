"""Handlers of the referral API: read validated input, call one use case, dump a response."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, querystring_schema, request_schema, response_schema

from services.referral.api.cursor import decode_cursor, encode_cursor
from services.referral.api.schemas import (
    ActivateRequestSchema,
    CodeByEmailQuerySchema,
    CodeSchema,
    CreateCodeRequestSchema,
    InternalCodePathSchema,
    InternalCodeSchema,
    InternalErasureQuerySchema,
    InternalLinkRequestSchema,
    InternalReservationPathSchema,
    InternalReservationRequestSchema,
    InternalReservationSchema,
    InternalUserExportSchema,
    InternalUserPathSchema,
    LeaderboardQuerySchema,
    LeaderboardSchema,
    PublicCodeSchema,
    ReferralListSchema,
    ReferralSchema,
    ReferralsQuerySchema,
    ReferrerPathSchema,
    StatsSchema,
)
from services.referral.appkeys import USE_CASES
from services.referral.domain.models import (
    Leaderboard,
    Referral,
    ReferralPage,
    ReferrerStats,
    Reservation,
    UserExport,
)
from services.referral.domain.rules import mask_email
from services.referral.settings import API_PREFIX, INTERNAL_PREFIX
from shared import health
from shared.access import public, service
from shared.idempotency import by_subject, idempotent
from shared.openapi import problem_responses
from shared.problems import InvalidToken
from shared.responses import json_response
from shared.tokens import CLAIMS, AccessClaims

TAG = ["referral"]
INTERNAL_TAG = ["internal (service to service)"]

_code_schema = CodeSchema()
_referral_schema = ReferralSchema()
_internal_code_schema = InternalCodeSchema()
_reservation_schema = InternalReservationSchema()

# How a signup and an activation racing for a code's last use are decided (both operations say it).
LAST_USE_RACE = (
    "`max_uses` holds under any concurrency: a code never has more links than its `max_uses`. Each "
    "activation and each signup with the code takes one use in a single statement that checks the "
    "limit under the code's row lock; when a signup and an activation race for the last use, whichever "
    "statement takes that lock first gets it, and the other answers 409 `code_exhausted` (a signup "
    "then creates nothing). A signup's use is taken before its user is created and its link later "
    "consumes it, so a signup accepted with the last use is never refused afterwards."
)


def _email_of(claims: AccessClaims) -> str:
    if not claims.email:
        raise InvalidToken("the token carries no email")
    return claims.email


def _page_body(page: ReferralPage) -> dict[str, object]:
    return {
        "referrer_id": str(page.referrer_id),
        "total": page.total,
        "confirmed": page.confirmed,
        "items": [
            {
                "referral_id": item.referral_id,
                "email": item.email if page.emails_visible else mask_email(item.email),
                "joined_at": item.joined_at.isoformat(),
                "status": item.status,
            }
            for item in page.items
        ],
        "next_cursor": encode_cursor(page.next_cursor) if page.next_cursor else None,
    }


def _referral_body(referral: Referral) -> dict[str, object]:
    return dict(_referral_schema.dump(referral))


def _reservation_body(reservation: Reservation) -> dict[str, object]:
    code = reservation.code
    return dict(
        _reservation_schema.dump(
            {
                "referral_id": reservation.referral_id,
                "code": code.code,
                "owner_id": code.owner_id,
                "expires_at": code.expires_at,
                "max_uses": code.max_uses,
                "uses": code.uses,
                "reserved_until": reservation.expires_at,
            }
        )
    )


@idempotent(by_subject)
@docs(
    tags=TAG,
    summary="Create my referral code",
    description=(
        "One active code per user. Omit `code` to get a generated one. `max_uses` (1 to 1,000,000) "
        "limits how many users can become referrals with the code; omit it for no limit. `uses` "
        "counts them.\n\n"
        "Only for a user whose email address is proven: the access token says `email_verified: true`, "
        "or the auth service has told this service since the token was issued. Otherwise 403 "
        "`email_unverified`, answered before the body's values are checked against the rules "
        "(a malformed body is still 422) and before anything is written: verify the address, then "
        "log in again or simply retry."
    ),
    responses=problem_responses(400, 401, 403, 409, 413, 415, 422),
)
@request_schema(CreateCodeRequestSchema)
@response_schema(CodeSchema, 201, description="The new code")
async def create_code(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    data = request["data"]
    code = await request.app[USE_CASES].create_code(
        claims.user_id,
        _email_of(claims),
        data["expires_at"],
        data["code"],
        email_verified=claims.email_verified,
        max_uses=data["max_uses"],
    )
    return json_response(_code_schema.dump(code), status=201)


@docs(tags=TAG, summary="My active referral code", responses=problem_responses(401, 404))
@response_schema(CodeSchema, 200, description="The caller's active code")
async def get_my_code(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    code = await request.app[USE_CASES].my_code(claims.user_id)
    return json_response(_code_schema.dump(code))


@docs(
    tags=TAG,
    summary="Delete my active referral code",
    description="Refused at once by every later request; a new code can be created afterwards.",
    responses={204: {"description": "Deleted"}, **problem_responses(401, 404)},
)
async def delete_my_code(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    await request.app[USE_CASES].delete_my_code(claims.user_id)
    return web.Response(status=204)


@docs(
    tags=TAG,
    summary="A referrer's active code, by the referrer's email",
    description=(
        "Public. The same 404 for an unknown email and for a user without an active code. The "
        "gateway limits how often one client may look codes up (429 with Retry-After)."
    ),
    responses=problem_responses(404, 422, 429),
)
@querystring_schema(CodeByEmailQuerySchema)
@response_schema(PublicCodeSchema, 200, description="The active code")
@public
async def code_by_email(request: web.Request) -> web.Response:
    code = await request.app[USE_CASES].code_by_email(request["querystring"]["email"])
    # PublicCodeSchema's shape, built directly: the hottest answer skips a marshmallow dump.
    return json_response({"code": code.code, "expires_at": code.expires_at.isoformat()})


@idempotent(by_subject)
@docs(
    tags=TAG,
    summary="Become the referral of a code's owner",
    description=(
        "The link's `status` is `confirmed` when the caller's email address is proven (the access "
        "token says `email_verified: true`, or the auth service has told this service), else "
        "`pending`: a pending link becomes confirmed by itself once the caller verifies the address. "
        "422 `self_referral` for the code's owner, also under another spelling of the owner's "
        "address: case, the dots of a Gmail or Googlemail local part, a `+tag` on any domain."
        "\n\n409 `code_exhausted`: the code's `max_uses` links exist (or are held for signups). "
        + LAST_USE_RACE
    ),
    responses=problem_responses(400, 401, 404, 409, 410, 413, 415, 422),
)
@request_schema(ActivateRequestSchema)
@response_schema(ReferralSchema, 201, description="The link")
async def activate(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    referral = await request.app[USE_CASES].activate(
        claims.user_id, _email_of(claims), request["data"]["code"], email_verified=claims.email_verified
    )
    return json_response(_referral_body(referral), status=201)


@docs(
    tags=TAG,
    summary="A referrer's referrals, newest first",
    description=(
        "Keyset pagination: pass `next_cursor` as `cursor`. Emails are masked unless you are the "
        "referrer. `total` counts all the referrer's referrals and `confirmed` those whose address is "
        "proven, both as of the same moment as the page; each item has its own `status`."
    ),
    responses=problem_responses(401, 422),
)
@match_info_schema(ReferrerPathSchema, put_into="path")
@querystring_schema(ReferralsQuerySchema)
@response_schema(ReferralListSchema, 200, description="One page")
async def list_referrals(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    referrer_id = request["path"]["referrer_id"]
    query = request["querystring"]
    after = decode_cursor(query["cursor"]) if query["cursor"] else None
    page = await request.app[USE_CASES].referrals_of(
        referrer_id, query["limit"], after, viewer_id=claims.user_id
    )
    return json_response(_page_body(page))


def _stats_body(stats: ReferrerStats) -> dict[str, object]:
    code = stats.code
    return {
        "referrer_id": str(stats.referrer_id),
        "total": stats.total,
        "confirmed": stats.confirmed,
        "pending": stats.pending,
        "levels": [
            {"level": level.level, "total": level.total, "confirmed": level.confirmed}
            for level in stats.levels
        ],
        "code": (
            {
                "code": code.code,
                "expires_at": code.expires_at.isoformat(),
                "max_uses": code.max_uses,
                "uses": code.uses,
            }
            if code
            else None
        ),
    }


def _leaderboard_body(board: Leaderboard) -> dict[str, object]:
    return {
        "period": board.period,
        "items": [
            {
                "rank": item.rank,
                "referrer_id": str(item.referrer_id),
                "email": item.email,
                "confirmed": item.confirmed,
            }
            for item in board.items
        ],
    }


@docs(
    tags=TAG,
    summary="A referrer's statistics by level (the referrer only)",
    description=(
        "`levels` has every level from 1 (direct referrals) and 2 (their referrals) to "
        "REFERRAL_STATS_DEPTH (default 3, at most 5), zeros included; a level counts the referrals "
        "that many links below the referrer, `confirmed` those whose own link is confirmed. `total`, "
        "`confirmed` and `pending` add the levels up. `code` is the active code, or null. Kept by the "
        "database as links are made and confirmed: a few rows read, whatever the number of "
        "referrals. Anyone but the referrer gets 403 `forbidden`."
    ),
    responses=problem_responses(401, 403, 422),
)
@match_info_schema(ReferrerPathSchema, put_into="path")
@response_schema(StatsSchema, 200, description="The statistics")
async def referrer_stats(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    stats = await request.app[USE_CASES].stats(request["path"]["referrer_id"], viewer_id=claims.user_id)
    return json_response(_stats_body(stats))


@docs(
    tags=TAG,
    summary="The referrers with the most confirmed referrals in a period",
    description=(
        "Public. Referrers ranked by the links confirmed in the period (when each became confirmed): "
        "`week` is the current ISO week, from Monday 00:00 UTC; `month` the current calendar month "
        "in UTC; `all` all time. Same count: the earlier first confirmation in the period ranks "
        "first, then the smaller referrer id. Emails are masked; an email is null when this service "
        "never saw it (a referrer whose data was erased). Kept by the database as links are "
        "confirmed: a read is a range scan of `limit` entries."
    ),
    responses=problem_responses(422),
)
@querystring_schema(LeaderboardQuerySchema)
@response_schema(LeaderboardSchema, 200, description="The leaderboard")
@public
async def leaderboard(request: web.Request) -> web.Response:
    query = request["querystring"]
    board = await request.app[USE_CASES].leaderboard(query["period"], query["limit"])
    return json_response(_leaderboard_body(board))


@docs(
    tags=TAG,
    summary="Liveness, through the gateway",
    description="200 while this service's process runs; the same as its own `/healthz`.",
    responses={200: {"description": "Alive"}},
)
@public
async def healthz(request: web.Request) -> web.Response:
    return await health.healthz(request)


# --- internal: the auth service only (its service token: internal audience and scope) -----------


@docs(
    tags=INTERNAL_TAG,
    summary="Take a use of a code for a signup about to be accepted (service token); idempotent",
    description=(
        "The auth service's check of a signup's code, before it creates the user whose id it chose "
        "(`referral_id`): the code must be active and have a use left, and one use is taken for that "
        "user now. The signup's link (`POST /internal/v1/referrals`) consumes this reservation "
        "instead of taking a use again, so it is never refused for want of one. The same "
        "`referral_id` again answers the same reservation and takes nothing. A signup that fails "
        "after this gives the use back (`DELETE`); one that never tells (a crash) leaves a "
        "reservation that expires (`reserved_until`, 24 hours) and a sweep gives its use back.\n\n"
        "404 `code_not_found`, 410 `code_expired`, 409 `code_exhausted` (no use left). " + LAST_USE_RACE
    ),
    responses=problem_responses(400, 401, 403, 404, 409, 410, 415, 422),
)
@match_info_schema(InternalCodePathSchema, put_into="path")
@request_schema(InternalReservationRequestSchema)
@response_schema(InternalReservationSchema, 201, description="The reservation, with the code and its owner")
@service
async def internal_reserve(request: web.Request) -> web.Response:
    reservation = await request.app[USE_CASES].reserve_use(
        request["path"]["code"], request["data"]["referral_id"]
    )
    return json_response(_reservation_body(reservation), status=201)


@docs(
    tags=INTERNAL_TAG,
    summary="Give back a signup's reserved use (service token); idempotent",
    description=(
        "The signup the reservation was taken for failed before its user was created: the use goes "
        "back to the code. 204 every time, also when there is nothing to release (released already, "
        "expired, or consumed by the signup's link: a consumed use stays the link's)."
    ),
    responses={204: {"description": "Released, or nothing to release"}, **problem_responses(401, 403, 422)},
)
@match_info_schema(InternalReservationPathSchema, put_into="path")
@service
async def internal_release(request: web.Request) -> web.Response:
    path = request["path"]
    await request.app[USE_CASES].release_use(path["code"], path["referral_id"])
    return web.Response(status=204)


@docs(
    tags=INTERNAL_TAG,
    summary="Check a code before a signup is accepted (service token)",
    responses=problem_responses(401, 403, 404, 410, 422),
)
@match_info_schema(InternalCodePathSchema, put_into="path")
@response_schema(InternalCodeSchema, 200, description="The usable code and its owner")
@service
async def internal_code(request: web.Request) -> web.Response:
    code = await request.app[USE_CASES].usable_code(request["path"]["code"])
    return json_response(_internal_code_schema.dump(code))


@docs(
    tags=INTERNAL_TAG,
    summary="Record a signup's link (service token); idempotent by referral id",
    description=(
        "The link consumes the use the signup reserved (`POST /internal/v1/codes/{code}/reservations`) "
        "and is recorded even if the code was exhausted or deleted since. Without a reservation (it "
        "expired), the link takes a use as an activation does: 409 `code_exhausted` when none is left."
    ),
    responses={
        200: {"description": "Already recorded, the same link"},
        **problem_responses(400, 401, 403, 409, 415, 422),
    },
)
@request_schema(InternalLinkRequestSchema)
@response_schema(ReferralSchema, 201, description="Recorded now")
@service
async def internal_link(request: web.Request) -> web.Response:
    data = request["data"]
    linked = await request.app[USE_CASES].record_signup_link(
        data["referral_id"], data["referrer_id"], data["referral_email"], data["code"]
    )
    return json_response(_referral_body(linked.referral), status=201 if linked.created else 200)


@docs(
    tags=INTERNAL_TAG,
    summary="A user's email address is proven (service token); idempotent",
    description=(
        "The user is recorded as proven and their pending link, if any, becomes confirmed; a link "
        "recorded for them later is confirmed when it is written. No body. 204 every time, also when "
        "the user has no link (yet) or the notice was already received."
    ),
    responses={204: {"description": "Recorded"}, **problem_responses(401, 403, 422)},
)
@match_info_schema(InternalUserPathSchema, put_into="path")
@service
async def internal_user_verified(request: web.Request) -> web.Response:
    await request.app[USE_CASES].confirm_user(request["path"]["user_id"])
    return web.Response(status=204)


def _exported_link(link: Referral) -> dict[str, object]:
    return {
        "referrer_id": str(link.referrer_id),
        "referral_id": str(link.referral_id),
        "email": link.referral_email,
        "code": link.code,
        "status": link.status,
        "created_at": link.created_at.isoformat(),
        "confirmed_at": link.confirmed_at.isoformat() if link.confirmed_at else None,
    }


def _export_body(export: UserExport) -> dict[str, object]:
    return {
        "user_id": str(export.user_id),
        "email_verified_at": export.email_verified_at.isoformat() if export.email_verified_at else None,
        "codes": [
            {
                "code": record.code.code,
                "status": record.state,
                "created_at": record.code.created_at.isoformat(),
                "expires_at": record.code.expires_at.isoformat(),
                "deleted_at": record.code.deleted_at.isoformat() if record.code.deleted_at else None,
                "max_uses": record.code.max_uses,
                "uses": record.code.uses,
            }
            for record in export.codes
        ],
        "referrer": _exported_link(export.referrer) if export.referrer else None,
        "referrals": [_exported_link(link) for link in export.referrals],
    }


@docs(
    tags=INTERNAL_TAG,
    summary="Everything this service holds about a user, for their data export (service token)",
    description=(
        "The auth service's `GET /api/v1/auth/me/export` asks for this. Every code the user ever had "
        "(deleted and expired ones too, with `uses` and `max_uses`), their own link (`referrer`: who "
        "referred them, null if nobody), the links of the users they referred (emails unmasked: they "
        "are the referrer), and when the user's address was said to be proven. Read in one snapshot. "
        "A user this service knows nothing of answers 200 with empty lists. `Cache-Control: no-store`."
    ),
    responses=problem_responses(401, 403, 422),
)
@match_info_schema(InternalUserPathSchema, put_into="path")
@response_schema(InternalUserExportSchema, 200, description="The user's records")
@service
async def internal_user_export(request: web.Request) -> web.Response:
    export = await request.app[USE_CASES].export_user(request["path"]["user_id"])
    return json_response(_export_body(export), headers={"Cache-Control": "no-store"})


@docs(
    tags=INTERNAL_TAG,
    summary="Erase a user's data here (service token); idempotent",
    description=(
        "The auth service erased the account. The user's codes are deleted and keep no owner or address; "
        "their texts are never issued again. Every link of the user is re-keyed to `replacement_id`, "
        "their own without their address: referrers keep their counts at every level (statistics and "
        "the leaderboard stay exact), the user's referrals keep their place, and nothing points at the "
        "person. Their access tokens are refused from now on, and a link or notice for them that "
        "arrives later is refused (410 `user_erased`) or ignored. 204 every time, also when there is "
        "nothing (left) to erase."
    ),
    responses={204: {"description": "Erased"}, **problem_responses(401, 403, 422)},
)
@match_info_schema(InternalUserPathSchema, put_into="path")
@querystring_schema(InternalErasureQuerySchema, put_into="query")
@service
async def internal_erase_user(request: web.Request) -> web.Response:
    await request.app[USE_CASES].erase_user(
        request["path"]["user_id"], request["query"].get("replacement_id")
    )
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    """Every public route under /api/v1/referral, and the internal ones under /internal/v1."""
    app.router.add_get(f"{API_PREFIX}/healthz", healthz)
    app.router.add_post(f"{API_PREFIX}/codes", create_code)
    app.router.add_get(f"{API_PREFIX}/codes/me", get_my_code)
    app.router.add_delete(f"{API_PREFIX}/codes/me", delete_my_code)
    app.router.add_get(f"{API_PREFIX}/codes", code_by_email)
    app.router.add_post(f"{API_PREFIX}/referrals", activate)
    # `[^/]+`: aiohttp's default segment pattern leaves out `{` and `}`, so such an id or code would
    # answer a bare 404 instead of reaching the schema that says what is wrong with it (422).
    app.router.add_get(f"{API_PREFIX}/referrers/{{referrer_id:[^/]+}}/referrals", list_referrals)
    app.router.add_get(f"{API_PREFIX}/referrers/{{referrer_id:[^/]+}}/stats", referrer_stats)
    app.router.add_get(f"{API_PREFIX}/leaderboard", leaderboard)
    app.router.add_get(f"{INTERNAL_PREFIX}/codes/{{code:[^/]+}}", internal_code)
    app.router.add_post(f"{INTERNAL_PREFIX}/codes/{{code:[^/]+}}/reservations", internal_reserve)
    app.router.add_delete(
        f"{INTERNAL_PREFIX}/codes/{{code:[^/]+}}/reservations/{{referral_id:[^/]+}}", internal_release
    )
    app.router.add_post(f"{INTERNAL_PREFIX}/referrals", internal_link)
    app.router.add_post(f"{INTERNAL_PREFIX}/users/{{user_id:[^/]+}}/verified", internal_user_verified)
    app.router.add_get(f"{INTERNAL_PREFIX}/users/{{user_id:[^/]+}}/export", internal_user_export)
    app.router.add_delete(f"{INTERNAL_PREFIX}/users/{{user_id:[^/]+}}", internal_erase_user)
