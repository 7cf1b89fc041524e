"""The auth service: signup, OAuth2 tokens, JWKS, profile."""
