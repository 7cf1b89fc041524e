"""Adapters of the auth service: how it talks to PostgreSQL, Redis, HTTP services, SMTP and the signer."""
