"""The opaque pagination cursor: where the previous page ended, base64url-encoded."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime

import orjson

from services.referral.domain.models import Cursor
from shared.problems import ValidationProblem


def encode_cursor(cursor: Cursor) -> str:
    raw = orjson.dumps([cursor.created_at.isoformat(), str(cursor.referral_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> Cursor:
    """The cursor, or 422 naming the `cursor` parameter."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        created_at, referral_id = json.loads(raw)
        moment = datetime.fromisoformat(created_at)
        # In UTC: PostgreSQL refuses offsets beyond 15:59, and year 10000 is an OverflowError here.
        cursor = Cursor(moment.astimezone(UTC), uuid.UUID(referral_id)) if moment.tzinfo else None
    except (ValueError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError, OverflowError):
        cursor = None
    if cursor is None:
        raise ValidationProblem(errors={"cursor": ["Not a cursor this service issued."]})
    return cursor
