"""Request and response schemas of the referral API (they also generate its OpenAPI document)."""

from __future__ import annotations

import re

from marshmallow import Schema, ValidationError, fields, validate

from services.referral.domain.models import CODE_STATES, PERIODS, STATUSES
from shared.schemas import TrimmedEmail, UtcDateTime

CODE_PATTERN = r"^[A-Za-z0-9_-]{4,32}$"
MAX_USES_LIMIT = 1_000_000
_CODE_TEXT = re.compile(r"[A-Za-z0-9_-]{4,32}")


def _whole_code(value: str) -> None:
    # Regexp's `$` also matches before a final newline: the whole text must match.
    if not _CODE_TEXT.fullmatch(value):
        raise ValidationError("4 to 32 of A-Z a-z 0-9 _ -")


class CreateCodeRequestSchema(Schema):
    expires_at = UtcDateTime(
        required=True,
        metadata={"description": "RFC 3339 with an offset; at least 1 minute and at most 365 days ahead"},
    )
    code = fields.String(
        load_default=None,
        validate=[validate.Regexp(CODE_PATTERN, error="4 to 32 of A-Z a-z 0-9 _ -"), _whole_code],
        metadata={"description": "a vanity code (case-insensitive); omitted: one is generated"},
    )
    max_uses = fields.Integer(
        load_default=None,
        allow_none=True,
        strict=True,
        validate=validate.Range(min=1, max=MAX_USES_LIMIT),
        metadata={
            "description": "at most this many users can become referrals with the code (1 to 1,000,000);"
            " omitted or null: no limit",
            "example": 10,
        },
    )


_USES_DESCRIPTION = (
    "links made with the code, plus the uses held for signups with it whose link is on its way; never "
    "more than `max_uses`"
)


class CodeSchema(Schema):
    code = fields.String(required=True, metadata={"example": "K7QM2XRT4HZ"})
    expires_at = fields.DateTime(required=True)
    created_at = fields.DateTime(required=True)
    owner_id = fields.UUID(required=True)
    max_uses = fields.Integer(
        required=True, allow_none=True, metadata={"description": "the usage limit; null: none"}
    )
    uses = fields.Integer(required=True, metadata={"description": _USES_DESCRIPTION})


class PublicCodeSchema(Schema):
    code = fields.String(required=True)
    expires_at = fields.DateTime(required=True)


class CodeByEmailQuerySchema(Schema):
    email = TrimmedEmail(required=True, metadata={"description": "the referrer's email"})


def _no_nul(value: str) -> None:
    # PostgreSQL text cannot hold U+0000; no code contains it.
    if "\x00" in value:
        raise ValidationError("must not contain U+0000")


class ActivateRequestSchema(Schema):
    code = fields.String(required=True, validate=[validate.Length(min=1, max=64), _no_nul])


_STATUS_DESCRIPTION = (
    "`pending` until the referral's email address is proven (verified with the auth service), then "
    "`confirmed`; a link never goes back to pending"
)


def _status_field() -> fields.String:
    return fields.String(
        required=True,
        validate=validate.OneOf(STATUSES),
        metadata={"description": _STATUS_DESCRIPTION, "example": "confirmed"},
    )


class ReferralSchema(Schema):
    referrer_id = fields.UUID(required=True)
    referral_id = fields.UUID(required=True)
    created_at = fields.DateTime(required=True)
    status = _status_field()


class ReferrerPathSchema(Schema):
    referrer_id = fields.UUID(required=True)


class ReferralsQuerySchema(Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "`next_cursor` of the previous page"},
    )


class ReferralItemSchema(Schema):
    referral_id = fields.UUID(required=True)
    email = fields.String(required=True, metadata={"description": "masked unless you are the referrer"})
    joined_at = fields.DateTime(required=True)
    status = _status_field()


class ReferralListSchema(Schema):
    referrer_id = fields.UUID(required=True)
    total = fields.Integer(required=True, metadata={"description": "all the referrer's referrals"})
    confirmed = fields.Integer(
        required=True, metadata={"description": "those of them whose status is `confirmed`"}
    )
    items = fields.List(fields.Nested(ReferralItemSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class InternalCodeSchema(Schema):
    code = fields.String(required=True)
    owner_id = fields.UUID(required=True)
    expires_at = fields.DateTime(required=True)


class InternalCodePathSchema(Schema):
    # Outside the code alphabet no code can exist: 422, which the auth service reads as "no such code".
    code = fields.String(
        required=True,
        validate=[validate.Regexp(CODE_PATTERN, error="4 to 32 of A-Z a-z 0-9 _ -"), _whole_code],
    )


class InternalReservationRequestSchema(Schema):
    referral_id = fields.UUID(
        required=True, metadata={"description": "the id of the user the auth service is about to create"}
    )


class InternalReservationSchema(Schema):
    referral_id = fields.UUID(required=True)
    code = fields.String(required=True)
    owner_id = fields.UUID(required=True)
    expires_at = fields.DateTime(required=True, metadata={"description": "the code's expiry"})
    max_uses = fields.Integer(required=True, allow_none=True)
    uses = fields.Integer(required=True, metadata={"description": "with this reservation's use"})
    reserved_until = fields.DateTime(
        required=True, metadata={"description": "when the use goes back if no link has consumed it"}
    )


class InternalReservationPathSchema(Schema):
    code = fields.String(
        required=True,
        validate=[validate.Regexp(CODE_PATTERN, error="4 to 32 of A-Z a-z 0-9 _ -"), _whole_code],
    )
    referral_id = fields.UUID(required=True)


class InternalLinkRequestSchema(Schema):
    referral_id = fields.UUID(required=True)
    referrer_id = fields.UUID(required=True)
    referral_email = TrimmedEmail(required=True)
    code = fields.String(required=True, validate=validate.Length(min=1, max=64))


class InternalUserPathSchema(Schema):
    user_id = fields.UUID(required=True)


class ExportedCodeSchema(Schema):
    code = fields.String(required=True)
    status = fields.String(
        required=True,
        validate=validate.OneOf(CODE_STATES),
        metadata={
            "description": "`active`; `expired` (its expiry passed); `deleted` (by its owner before it "
            "expired)"
        },
    )
    created_at = fields.DateTime(required=True)
    expires_at = fields.DateTime(required=True)
    deleted_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={
            "description": "when it stopped being usable (deleted, or closed at its expiry); null: open"
        },
    )
    max_uses = fields.Integer(required=True, allow_none=True, metadata={"description": "null: no limit"})
    uses = fields.Integer(required=True, metadata={"description": _USES_DESCRIPTION})


class ExportedLinkSchema(Schema):
    referrer_id = fields.UUID(required=True)
    referral_id = fields.UUID(required=True)
    email = fields.String(
        required=True, allow_none=True, metadata={"description": "the referral's email, unmasked"}
    )
    code = fields.String(required=True, metadata={"description": "the code the link was made with"})
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    created_at = fields.DateTime(required=True)
    confirmed_at = fields.DateTime(required=True, allow_none=True)


class InternalUserExportSchema(Schema):
    user_id = fields.UUID(required=True)
    email_verified_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "when the auth service said the user's address is proven; null: never"},
    )
    codes = fields.List(
        fields.Nested(ExportedCodeSchema),
        required=True,
        metadata={"description": "every code the user ever had, oldest first"},
    )
    referrer = fields.Nested(
        ExportedLinkSchema,
        required=True,
        allow_none=True,
        metadata={"description": "the user's own link (who referred them); null: nobody"},
    )
    referrals = fields.List(
        fields.Nested(ExportedLinkSchema),
        required=True,
        metadata={"description": "the users the user referred, oldest first"},
    )


class InternalErasureQuerySchema(Schema):
    replacement_id = fields.UUID(
        metadata={
            "description": (
                "the random id the person's place in the referral trees takes (the auth service re-keyed "
                "what it holds of them to it); absent: one is drawn"
            )
        }
    )


# --- the referral program --------------------------------------------------------------------------


class LevelSchema(Schema):
    level = fields.Integer(required=True, metadata={"description": "1: direct referrals, 2: theirs, ..."})
    total = fields.Integer(required=True, metadata={"description": "referrals at this level"})
    confirmed = fields.Integer(required=True, metadata={"description": "those of them that are confirmed"})


class StatsCodeSchema(Schema):
    code = fields.String(required=True)
    expires_at = fields.DateTime(required=True)
    max_uses = fields.Integer(
        required=True, allow_none=True, metadata={"description": "the usage limit; null: none"}
    )
    uses = fields.Integer(required=True, metadata={"description": _USES_DESCRIPTION})


class StatsSchema(Schema):
    referrer_id = fields.UUID(required=True)
    total = fields.Integer(required=True, metadata={"description": "referrals at every level shown"})
    confirmed = fields.Integer(required=True, metadata={"description": "those of them that are confirmed"})
    pending = fields.Integer(required=True, metadata={"description": "those of them that are pending"})
    levels = fields.List(
        fields.Nested(LevelSchema),
        required=True,
        metadata={"description": "every level from 1 to REFERRAL_STATS_DEPTH (default 3), zeros included"},
    )
    code = fields.Nested(
        StatsCodeSchema, required=True, allow_none=True, metadata={"description": "the active code, or null"}
    )


class LeaderboardQuerySchema(Schema):
    period = fields.String(
        load_default="month",
        validate=validate.OneOf(PERIODS),
        metadata={
            "description": (
                "`week`: the current ISO week, from Monday 00:00 UTC; `month`: the current calendar "
                "month in UTC; `all`: all time"
            )
        },
    )
    limit = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100))


class LeaderboardItemSchema(Schema):
    rank = fields.Integer(required=True, metadata={"description": "1 for the first; no two share one"})
    referrer_id = fields.UUID(required=True)
    email = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "description": (
                "masked (`j***@example.com`); null when this service never saw the referrer's email"
            )
        },
    )
    confirmed = fields.Integer(required=True, metadata={"description": "links confirmed in the period"})


class LeaderboardSchema(Schema):
    period = fields.String(required=True, validate=validate.OneOf(PERIODS))
    items = fields.List(fields.Nested(LeaderboardItemSchema), required=True)
