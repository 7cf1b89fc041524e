"""HTTP layer of the auth service: routes, handlers, marshmallow schemas."""
