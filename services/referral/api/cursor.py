"""The opaque pagination cursor: where the previous page ended, base64url-encoded."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime

import orjson

from services.referral.domain.models import Cursor
from shared.errors import ValidationProblem


def encode_cursor(cursor: Cursor) -> str:
    raw = orjson.dumps([cursor.created_at.isoformat(), str(cursor.referral_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> Cursor:
    """The cursor, or 422 naming the `cursor` parameter."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        created_at, referral_id = json.loads(raw)
        cursor = Cursor(datetime.fromisoformat(created_at), uuid.UUID(referral_id))
    except (ValueError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError):
        cursor = None
    if cursor is None or cursor.created_at.tzinfo is None:
        raise ValidationProblem(errors={"cursor": ["Not a cursor this service issued."]})
    return cursor
