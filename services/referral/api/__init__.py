"""HTTP layer of the referral service: routes, handlers, marshmallow schemas."""
