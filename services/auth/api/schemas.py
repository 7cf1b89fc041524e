"""Request and response schemas of the auth API (they also generate its OpenAPI document)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, validate

from shared.schemas import TrimmedEmail

PASSWORD_MIN = 8
PASSWORD_MAX = 128


class TrimmedString(fields.String):
    """A string with surrounding whitespace removed before it is validated."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
        return super()._deserialize(value, attr, data, **kwargs)


class SignupRequestSchema(Schema):
    email = TrimmedEmail(required=True, metadata={"example": "jane@example.com"})
    password = fields.String(
        required=True,
        validate=validate.Length(min=PASSWORD_MIN, max=PASSWORD_MAX),
        metadata={"description": "8 to 128 characters", "format": "password"},
    )
    referral_code = TrimmedString(
        load_default=None,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "a referrer's code (case-insensitive): its owner becomes the referrer"},
    )


class UserSchema(Schema):
    id = fields.UUID(required=True)
    email = fields.String(required=True)
    created_at = fields.DateTime(required=True)
    referrer_id = fields.UUID(required=True, allow_none=True)


class MeSchema(UserSchema):
    email_check = fields.Raw(
        required=True, allow_none=True, metadata={"description": "the email verifier's verdict, if any"}
    )
    profile = fields.Raw(required=True, allow_none=True, metadata={"description": "enriched profile, if any"})


class TokenResponseSchema(Schema):
    access_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "Bearer"})
    expires_in = fields.Integer(required=True, metadata={"description": "seconds"})
    refresh_token = fields.String(required=True)


class SignupResponseSchema(Schema):
    user = fields.Nested(UserSchema, required=True)
    access_token = fields.String(required=True)
    refresh_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "Bearer"})
    expires_in = fields.Integer(required=True)


class OAuthErrorSchema(Schema):
    error = fields.String(required=True)
    error_description = fields.String(required=True)


class JwkSchema(Schema):
    kty = fields.String(required=True)
    kid = fields.String(required=True)
    use = fields.String(required=True)
    alg = fields.String(required=True)
    n = fields.String(required=True)
    e = fields.String(required=True)


class JwksSchema(Schema):
    keys = fields.List(fields.Nested(JwkSchema), required=True)


class DiscoverySchema(Schema):
    issuer = fields.String(required=True)
    jwks_uri = fields.String(required=True)
    token_endpoint = fields.String(required=True)
    revocation_endpoint = fields.String(required=True)
    grant_types_supported = fields.List(fields.String(), required=True)
    token_endpoint_auth_methods_supported = fields.List(fields.String(), required=True)
    revocation_endpoint_auth_methods_supported = fields.List(fields.String(), required=True)
