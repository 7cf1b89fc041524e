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


# --- data rights: sessions and the export ----------------------------------------------------------


class SessionSchema(Schema):
    id = fields.UUID(
        required=True,
        metadata={"description": "the login (its refresh-token family); the `sid` of its access tokens"},
    )
    created_at = fields.DateTime(required=True, metadata={"description": "when the login happened"})
    last_used_at = fields.DateTime(
        required=True, metadata={"description": "the login, or its latest refresh (token rotation)"}
    )
    user_agent = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "description": "the User-Agent of the login or latest refresh (printable characters, at most "
            "256); null when none was sent"
        },
    )
    address = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "description": "the client's address at the login or latest refresh, as the edge saw it "
            "(`X-Forwarded-For` believed only from trusted proxies)"
        },
    )
    current = fields.Boolean(
        required=True,
        metadata={"description": "the session of the access token that asked (its `sid` claim)"},
    )


class SessionListSchema(Schema):
    items = fields.List(
        fields.Nested(SessionSchema),
        required=True,
        metadata={"description": "the live logins, the most recently used first"},
    )


class ExportedAccountSchema(UserSchema):
    has_password = fields.Boolean(
        required=True,
        metadata={"description": "whether the account has a password (never the password or its hash)"},
    )
    email_verified_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "when the referral service was told the address is proven; null: not (yet)"},
    )


class IdentitySchema(Schema):
    provider = fields.String(required=True)
    subject = fields.String(required=True, metadata={"description": "the provider's id of the account"})
    email = fields.String(required=True, metadata={"description": "the email the provider gave"})
    created_at = fields.DateTime(required=True, metadata={"description": "when it was linked"})


class ExportedCodeSchema(Schema):
    code = fields.String(required=True)
    status = fields.String(
        required=True,
        validate=validate.OneOf(("active", "expired", "deleted")),
        metadata={"description": "`active`; `expired`; `deleted` (by its owner, before it expired)"},
    )
    created_at = fields.DateTime(required=True)
    expires_at = fields.DateTime(required=True)
    deleted_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "when it stopped being usable (deleted, or closed at its expiry)"},
    )
    max_uses = fields.Integer(required=True, allow_none=True, metadata={"description": "null: no limit"})
    uses = fields.Integer(required=True, metadata={"description": "users who became referrals with it"})


class ExportedLinkSchema(Schema):
    referrer_id = fields.UUID(required=True)
    referral_id = fields.UUID(required=True)
    email = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "the referral's email (unmasked: it is the referrer's to see)"},
    )
    code = fields.String(required=True, metadata={"description": "the code the link was made with"})
    status = fields.String(required=True, validate=validate.OneOf(("pending", "confirmed")))
    created_at = fields.DateTime(required=True)
    confirmed_at = fields.DateTime(required=True, allow_none=True)


class DataExportSchema(Schema):
    exported_at = fields.DateTime(required=True)
    account = fields.Nested(ExportedAccountSchema, required=True)
    identities = fields.List(
        fields.Nested(IdentitySchema),
        required=True,
        metadata={"description": "sign-in providers linked to the account, oldest first"},
    )
    email_check = fields.Raw(
        required=True, allow_none=True, metadata={"description": "the email verifier's verdict, if any"}
    )
    profile = fields.Raw(required=True, allow_none=True, metadata={"description": "enriched profile, if any"})
    sessions = fields.List(
        fields.Nested(SessionSchema), required=True, metadata={"description": "live logins"}
    )
    codes = fields.List(
        fields.Nested(ExportedCodeSchema),
        required=True,
        metadata={
            "description": "every referral code the user ever had, deleted and expired ones too, oldest first"
        },
    )
    referrer = fields.Nested(
        ExportedLinkSchema,
        required=True,
        allow_none=True,
        metadata={"description": "the user's own referral link (who referred them); null: nobody"},
    )
    referrals = fields.List(
        fields.Nested(ExportedLinkSchema),
        required=True,
        metadata={"description": "the users this user referred, oldest first"},
    )
