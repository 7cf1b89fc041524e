"""Typed application keys of the auth service (shared resources' keys live in shared.appkeys)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.auth.adapters.enrichment import EnrichmentScheduler
from services.auth.adapters.signing import KeyRing
from services.auth.domain.oauth import OAuthService
from services.auth.domain.ports import EmailVerifier
from services.auth.domain.use_cases import AuthService
from services.auth.settings import AuthSettings
from shared.net import Network
from shared.outbox import OutboxRelay

SETTINGS = web.AppKey("auth_settings", AuthSettings)
KEY_RING = web.AppKey("auth_key_ring", KeyRing)
AUTH_SERVICE = web.AppKey("auth_service", AuthService)
OAUTH_SERVICE = web.AppKey("auth_oauth_service", OAuthService)
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple[Network, ...])
# Every outbox relay the process runs (referral links, verified notices, mails).
RELAYS = web.AppKey("auth_relays", list[OutboxRelay[Any]])
# Present only when their vendor's API key is configured.
EMAIL_VERIFIER = web.AppKey("auth_email_verifier", EmailVerifier)
ENRICHMENT_SCHEDULER = web.AppKey("auth_enrichment_scheduler", EnrichmentScheduler)
