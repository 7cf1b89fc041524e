"""Typed application keys of the referral service (shared resources' keys live in shared.appkeys)."""

from __future__ import annotations

from aiohttp import web

from services.referral.domain.services import ReferralService
from services.referral.settings import ReferralSettings
from shared.tokens import TokenVerifier

SETTINGS = web.AppKey("referral_settings", ReferralSettings)
REFERRAL_SERVICE = web.AppKey("referral_service", ReferralService)
INTERNAL_VERIFIER = web.AppKey("internal_token_verifier", TokenVerifier)
