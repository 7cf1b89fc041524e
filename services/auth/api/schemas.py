"""Request and response schemas of the auth API (they also generate its OpenAPI document)."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

from shared.schemas import TrimmedEmail

PASSWORD_MIN = 8
PASSWORD_MAX = 128


class TrimmedString(fields.String):
    """A string with surrounding whitespace removed before it is validated."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
        return super()._deserialize(value, attr, data, **kwargs)


def _password(description: str) -> fields.String:
    return fields.String(
        required=True,
        validate=validate.Length(min=PASSWORD_MIN, max=PASSWORD_MAX),
        metadata={"description": description, "format": "password"},
    )


class SignupRequestSchema(Schema):
    email = TrimmedEmail(required=True, metadata={"example": "jane@example.com"})
    password = _password("8 to 128 characters")
    referral_code = TrimmedString(
        load_default=None,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "a referrer's code (case-insensitive): its owner becomes the referrer"},
    )


class UserSchema(Schema):
    id = fields.UUID(required=True)
    email = fields.String(required=True)
    email_verified = fields.Boolean(
        required=True, metadata={"description": "whether the owner of the address has proven it"}
    )
    created_at = fields.DateTime(required=True)
    referrer_id = fields.UUID(required=True, allow_none=True)


class MailTokenSchema(Schema):
    token = fields.String(
        required=True,
        validate=validate.Length(min=16, max=256),
        metadata={"description": "the token of the mailed link (after `#token=`)"},
    )


class ForgotPasswordSchema(Schema):
    email = TrimmedEmail(required=True, metadata={"example": "jane@example.com"})


class ResetPasswordSchema(MailTokenSchema):
    password = _password("the new password, 8 to 128 characters")


class ChangePasswordSchema(Schema):
    current_password = fields.String(
        required=True, validate=validate.Length(min=1, max=PASSWORD_MAX), metadata={"format": "password"}
    )
    new_password = _password("8 to 128 characters")


class EraseAccountSchema(Schema):
    password = fields.String(
        validate=validate.Length(min=1, max=PASSWORD_MAX),
        metadata={
            "format": "password",
            "description": "the account's password; required when it has one (not for provider-only ones)",
        },
    )


class VerifiedUserSchema(Schema):
    user = fields.Nested(UserSchema, required=True)


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


class ProviderPathSchema(Schema):
    provider = fields.String(required=True, validate=validate.Length(min=1, max=32))


class AuthorizeQuerySchema(Schema):
    referral_code = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "a referrer's code, applied if this sign-in creates the account"},
    )


class CallbackQuerySchema(Schema):
    """What the provider appends to the redirect; other parameters (iss, scope, ...) are ignored."""

    class Meta:
        unknown = EXCLUDE

    code = fields.String(load_default=None, validate=validate.Length(max=2048))
    state = fields.String(load_default=None, validate=validate.Length(max=512))
    error = fields.String(load_default=None, validate=validate.Length(max=256))
    error_description = fields.String(load_default=None, validate=validate.Length(max=2048))


class ProviderLinkSchema(Schema):
    name = fields.String(required=True)
    kind = fields.String(required=True, metadata={"description": "oidc or github"})
    authorization_endpoint = fields.String(required=True)


class DiscoverySchema(Schema):
    issuer = fields.String(required=True)
    jwks_uri = fields.String(required=True)
    token_endpoint = fields.String(required=True)
    revocation_endpoint = fields.String(required=True)
    grant_types_supported = fields.List(fields.String(), required=True)
    token_endpoint_auth_methods_supported = fields.List(fields.String(), required=True)
    revocation_endpoint_auth_methods_supported = fields.List(fields.String(), required=True)
    sign_in_providers = fields.List(
        fields.Nested(ProviderLinkSchema),
        required=True,
        metadata={"description": "the external providers one can sign up or in with"},
    )
