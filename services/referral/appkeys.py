"""Typed application keys of the referral service (shared resources' keys live in shared.appkeys)."""

from __future__ import annotations

from aiohttp import web

from services.referral.domain.use_cases import ReferralUseCases
from shared.tokens import TokenVerifier

USE_CASES = web.AppKey("referral_use_cases", ReferralUseCases)
INTERNAL_VERIFIER = web.AppKey("internal_token_verifier", TokenVerifier)
