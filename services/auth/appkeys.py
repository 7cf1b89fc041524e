"""Typed application keys of the auth service (shared resources' keys live in shared.appkeys)."""

from __future__ import annotations

from aiohttp import web

from services.auth.domain.services import AuthService
from services.auth.outbox import ReferralOutboxRelay
from services.auth.settings import AuthSettings
from services.auth.signing import KeyRing
from shared.net import Network

SETTINGS = web.AppKey("auth_settings", AuthSettings)
KEY_RING = web.AppKey("auth_key_ring", KeyRing)
AUTH_SERVICE = web.AppKey("auth_service", AuthService)
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple[Network, ...])
REFERRAL_RELAY = web.AppKey("auth_referral_relay", ReferralOutboxRelay)
