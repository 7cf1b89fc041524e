"""Marshmallow fields both services validate with."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marshmallow import ValidationError, fields, validate

EMAIL_MAX = 254


class TrimmedEmail(fields.Email):
    """An email, trimmed before it is validated; at most 254 characters (API.md)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(max=EMAIL_MAX), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
        return super()._deserialize(value, attr, data, **kwargs)


class UtcDateTime(fields.AwareDateTime):
    """An RFC 3339 time with an offset, loaded as the same instant in UTC.

    RFC 3339 allows offsets up to 23:59, PostgreSQL's input only up to 15:59; in UTC every instant
    is storable, and one the UTC calendar cannot hold (year 10000) is a validation error.
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        moment: datetime = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ValidationError("Not a time the calendar can hold in UTC.") from None
