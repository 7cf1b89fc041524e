"""Marshmallow fields both services validate with."""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

EMAIL_MAX = 254


class TrimmedEmail(fields.Email):
    """An email, trimmed before it is validated; at most 254 characters (API.md)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(max=EMAIL_MAX), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
        return super()._deserialize(value, attr, data, **kwargs)
