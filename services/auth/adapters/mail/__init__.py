"""Outgoing mail of the auth service: the SMTP transport and the verification and password-reset messages."""
