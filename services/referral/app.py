"""The referral service's application factory: every resource in a cleanup context, no globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.referral.adapters.code_cache import CodeCacheSettings, RedisCodeCache
from services.referral.adapters.repositories import (
    DENY_LIST,
    PostgresCodeRepository,
    PostgresProgramRepository,
    PostgresReferralRepository,
    PostgresUnitOfWork,
)
from services.referral.adapters.tables import idempotency_keys_table, webhook_outbox_table
from services.referral.api.handlers import add_routes
from services.referral.appkeys import INTERNAL_VERIFIER, USE_CASES
from services.referral.domain.rules import CodeRules
from services.referral.domain.use_cases import ReferralUseCases
from services.referral.settings import API_PREFIX, ReferralSettings
from shared.appkeys import DATABASE, HTTP_CLIENT, METRICS_REGISTRY, REDIS, TOKEN_VERIFIER
from shared.denylist import DenyList
from shared.idempotency import idempotency_ctx
from shared.jose import RemoteJWKS
from shared.openapi import setup_openapi
from shared.resources import CleanupContext, http_client_ctx, postgres_ctx, redis_ctx
from shared.tokens import TokenVerifier
from shared.web import setup_common
from shared.webhooks import webhooks_ctx

DESCRIPTION = """Referral codes (one active per user), their public lookup by email, and who referred whom.

Email ownership: creating a code needs a proven email address (else 403 `email_unverified`), and a
link is `pending` until its referral's address is proven, then `confirmed`. Proven means the access
token says `email_verified: true`, or the auth service has since told this service so; a pending link
becomes confirmed by itself then, whatever the order in which the two services heard of it.

Tokens are the auth service's access tokens, verified here against its JWKS. Errors are
`application/problem+json` (RFC 9457) with a stable `code`. Use **Authorize** with the OAuth2
password flow (email as username) to call the secured endpoints from this page."""

log = logging.getLogger(__name__)

# How often expired code reservations give their uses back (they expire after a day: a minute late
# changes nothing).
RESERVATION_SWEEP_SECONDS = 60.0

USER_AGENT = "referral-system-referral"
AUTH_TOKEN_URL = "/api/v1/auth/token"  # noqa: S105 (a path, not a secret)


def _verifiers_ctx(settings: ReferralSettings) -> CleanupContext:
    """Token verifiers sharing one cached JWKS, fetched from the auth service (never per request)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        jwks = RemoteJWKS(settings.auth_jwks_url, app[HTTP_CLIENT])
        app[TOKEN_VERIFIER] = TokenVerifier(
            jwks, issuer=settings.auth_issuer, audience=settings.token_audience
        )
        app[INTERNAL_VERIFIER] = TokenVerifier(
            jwks,
            issuer=settings.auth_issuer,
            audience=settings.internal_audience,
            required_scope=settings.internal_scope,
        )
        yield

    return ctx


def _use_cases_ctx(settings: ReferralSettings) -> CleanupContext:
    """The use cases wired to their adapters: PostgreSQL repositories and the Redis code cache."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = app[DATABASE]
        cache = RedisCodeCache(
            app[REDIS],
            prefix=settings.redis_prefix,
            settings=CodeCacheSettings(
                ttl=settings.cache_ttl,
                negative_ttl=settings.negative_cache_ttl,
                timeout=settings.redis_timeout,
                near_size=settings.near_cache_size,
                near_ttl=settings.near_cache_ttl,
            ),
            registry=app[METRICS_REGISTRY],
        )
        deny_list = DenyList(app[REDIS], database, DENY_LIST, prefix=settings.deny_list_prefix)
        # Users' tokens only: a service is never erased (INTERNAL_VERIFIER has no deny-list).
        app[TOKEN_VERIFIER].refuse_subjects(deny_list.is_denied)
        app[USE_CASES] = ReferralUseCases(
            codes=PostgresCodeRepository(database),
            referrals=PostgresReferralRepository(database),
            uow=PostgresUnitOfWork(database, webhook_endpoints=settings.webhook_urls),
            cache=cache,
            rules=CodeRules(
                min_lifetime=timedelta(seconds=settings.code_min_lifetime),
                max_lifetime=timedelta(days=settings.code_max_lifetime_days),
            ),
            program=PostgresProgramRepository(database),
            stats_depth=settings.stats_depth,
            deny_for=timedelta(seconds=settings.deny_list_ttl),
            deny_list=deny_list,
        )
        cache.near.start()
        deny_list.start()
        try:
            yield
        finally:
            await deny_list.stop()
            await cache.near.stop()

    return ctx


def _reservation_sweep_ctx(interval: float = RESERVATION_SWEEP_SECONDS) -> CleanupContext:
    """Gives back the uses of expired code reservations (signups that never delivered their link)."""

    async def sweep(app: web.Application) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await app[USE_CASES].release_expired_reservations()
            except Exception:  # the next round tries again; one failure must not stop the sweep
                log.exception("code reservation sweep failed")

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sweep(app))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return ctx


def create_app(settings: ReferralSettings) -> web.Application:
    """Build the referral service; resources open on startup and close on cleanup."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    setup_common(
        app,
        CollectorRegistry(),
        user_verifier=TOKEN_VERIFIER,
        service_verifier=INTERNAL_VERIFIER,
        cors_origins=settings.cors_origins,
    )
    app.cleanup_ctx.append(
        postgres_ctx(
            settings.database_url,
            minsize=settings.db_pool_min,
            maxsize=settings.db_pool_max,
            timeout=settings.db_timeout,
            server_prepare=settings.db_server_prepare,
        )
    )
    app.cleanup_ctx.append(redis_ctx(settings.redis_url, timeout=settings.redis_timeout))
    app.cleanup_ctx.append(http_client_ctx(timeout=5.0, user_agent=USER_AGENT))
    app.cleanup_ctx.append(_verifiers_ctx(settings))
    app.cleanup_ctx.append(_use_cases_ctx(settings))
    app.cleanup_ctx.append(_reservation_sweep_ctx())
    app.cleanup_ctx.append(
        webhooks_ctx(settings, webhook_outbox_table, metric_prefix="referral", user_agent=USER_AGENT)
    )
    app.cleanup_ctx.append(idempotency_ctx(idempotency_keys_table, lease=settings.idempotency_lease))
    add_routes(app)
    setup_openapi(
        app,
        prefix=API_PREFIX,
        title="Referral service",
        version="1.0.0",
        description=DESCRIPTION,
        token_url=AUTH_TOKEN_URL,
    )
    return app
