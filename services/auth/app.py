"""The auth service's application factory: every resource in a cleanup context, no globals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.auth.adapters.db.erasure import DENY_LIST, ErasureOutboxRepository
from services.auth.adapters.db.identities import IdentityRepository
from services.auth.adapters.db.outboxes import (
    MailOutboxRepository,
    ReferralOutboxRepository,
    VerifiedOutboxRepository,
)
from services.auth.adapters.db.repositories import RefreshTokenRepository, UserRepository
from services.auth.adapters.db.tables import idempotency_keys_table, webhook_outbox_table
from services.auth.adapters.db.unit_of_work import PostgresUnitOfWork
from services.auth.adapters.email_verification import CachedEmailVerifier, HunterEmailVerifier
from services.auth.adapters.enrichment import ClearbitPersonEnricher, EnrichmentScheduler
from services.auth.adapters.mail.smtp import SmtpMailer, parse_smtp_url
from services.auth.adapters.oauth.providers import create_provider
from services.auth.adapters.oauth.state import OAuthStateStore
from services.auth.adapters.passwords import PasswordHasher, lower_thread_priority
from services.auth.adapters.referral_client import ReferralClient, ServiceToken
from services.auth.adapters.relays import (
    ImmediateErasureDelivery,
    ImmediateReferralDelivery,
    erasure_relay,
    mail_relay,
    referral_link_relay,
    verified_notice_relay,
)
from services.auth.adapters.signing import AccessTokenIssuer, load_key_ring
from services.auth.adapters.throttle import LoginThrottle, MailLimiter, MailLimits, ThrottleLimits
from services.auth.api.handlers import add_routes
from services.auth.api.schemas import OAuthErrorSchema
from services.auth.appkeys import (
    AUTH_SERVICE,
    EMAIL_VERIFIER,
    ENRICHMENT_SCHEDULER,
    KEY_RING,
    OAUTH_SERVICE,
    RELAYS,
    SETTINGS,
    TRUSTED_PROXIES,
)
from services.auth.domain.models import RESET_PASSWORD, VERIFY_EMAIL
from services.auth.domain.oauth import OAuthService
from services.auth.domain.ownership import OwnershipMail
from services.auth.domain.use_cases import AuthService
from services.auth.settings import API_PREFIX, AuthSettings
from shared.appkeys import CACHE, DATABASE, HTTP_CLIENT, METRICS_REGISTRY, REDIS, TOKEN_VERIFIER
from shared.denylist import DenyList
from shared.idempotency import idempotency_ctx
from shared.jose import StaticKeySource
from shared.net import parse_networks
from shared.openapi import setup_openapi
from shared.outbox import Backoff, OutboxRelay
from shared.resources import CleanupContext, aiocache_ctx, http_client_ctx, postgres_ctx, redis_ctx
from shared.tokens import TokenVerifier
from shared.web import setup_common
from shared.webhooks import webhooks_ctx

log = logging.getLogger(__name__)

USER_AGENT = "referral-system-auth"
DESCRIPTION = """Signup, OAuth2 tokens (password and refresh_token grants), revocation and JWKS.

Errors are `application/problem+json` (RFC 9457) with a stable `code`, except on `/token` and
`/revoke`, which answer in the RFC 6749 format. Use **Authorize** with the OAuth2 password flow
(email as username) to call the secured endpoints from this page."""


async def _relays_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the outbox relays while the app runs; at shutdown let the deliveries in flight finish."""
    relays = app[RELAYS]
    for relay in relays:
        relay.start()
    try:
        yield
    finally:
        await asyncio.gather(*(relay.stop() for relay in relays))


def _in_words(seconds: int) -> str:
    """`24 hours`, `30 minutes`: how long a mailed link lives, for the mail's text."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def _email_verifier_ctx(settings: AuthSettings) -> CleanupContext:
    """Hunter's verifier behind the Redis cache, when a key is configured; no check otherwise."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if settings.hunter_api_key:
            hunter = HunterEmailVerifier(
                app[HTTP_CLIENT],
                api_key=settings.hunter_api_key,
                base_url=settings.hunter_base_url,
                timeout=settings.hunter_timeout,
                max_polls=settings.hunter_max_polls,
                poll_interval=settings.hunter_poll_interval,
            )
            app[EMAIL_VERIFIER] = CachedEmailVerifier(
                hunter, app[CACHE], prefix=settings.redis_prefix, ttl=settings.email_check_cache_ttl
            )
        yield

    return ctx


def _enrichment_ctx(settings: AuthSettings) -> CleanupContext:
    """The enrichment scheduler, when a key is configured; at shutdown it drains, then cancels."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if not settings.enrichment_api_key:
            yield
            return
        enricher = ClearbitPersonEnricher(
            app[HTTP_CLIENT],
            api_key=settings.enrichment_api_key,
            base_url=settings.enrichment_base_url,
            timeout=settings.enrichment_timeout,
            max_attempts=settings.enrichment_max_attempts,
            retry_delay=settings.enrichment_retry_delay,
        )
        scheduler = EnrichmentScheduler(
            enricher,
            UserRepository(app[DATABASE]),
            concurrency=settings.enrichment_concurrency,
            shutdown_grace=settings.enrichment_shutdown_grace,
        )
        app[ENRICHMENT_SCHEDULER] = scheduler
        try:
            yield
        finally:
            await scheduler.close()

    return ctx


def _auth_service_ctx(settings: AuthSettings) -> CleanupContext:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(
            max_workers=settings.hash_workers,
            thread_name_prefix="argon2",
            initializer=lower_thread_priority,
            initargs=(settings.hash_nice,),
        )
        hasher = PasswordHasher(
            executor,
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        await hasher.warm_up()
        ring = app[KEY_RING]
        database = app[DATABASE]
        issuer = AccessTokenIssuer(
            ring, issuer=settings.issuer, audience=settings.token_audience, ttl=settings.access_token_ttl
        )
        referrals = ReferralClient(
            app[HTTP_CLIENT],
            base_url=settings.referral_service_url,
            token=ServiceToken(issuer, audience=settings.referral_audience),
            timeout=settings.referral_timeout,
        )
        relay = referral_link_relay(
            ReferralOutboxRepository(database),
            referrals,
            backoff=Backoff(maximum=settings.outbox_max_backoff),
            poll_interval=settings.outbox_poll_interval,
            call_timeout=settings.referral_timeout,
            registry=app[METRICS_REGISTRY],
        )
        relays: list[OutboxRelay[Any]] = [relay]
        backoff = Backoff(maximum=settings.outbox_max_backoff)
        notice_relay = verified_notice_relay(
            VerifiedOutboxRepository(database),
            referrals,
            backoff=backoff,
            poll_interval=settings.outbox_poll_interval,
            call_timeout=settings.referral_timeout,
            registry=app[METRICS_REGISTRY],
        )
        relays.append(notice_relay)
        erasures = erasure_relay(
            ErasureOutboxRepository(database),
            referrals,
            backoff=backoff,
            poll_interval=settings.outbox_poll_interval,
            call_timeout=settings.referral_timeout,
            registry=app[METRICS_REGISTRY],
        )
        relays.append(erasures)
        deny_list = DenyList(app[REDIS], database, DENY_LIST, prefix=settings.deny_list_prefix)
        app[TOKEN_VERIFIER].refuse_subjects(deny_list.is_denied)
        deny_list.start()
        woken: list[OutboxRelay[Any]] = [notice_relay]  # after each commit that writes to their outbox
        if settings.smtp_url:
            mailer = SmtpMailer(parse_smtp_url(settings.smtp_url, timeout=settings.smtp_timeout))
            sending = mail_relay(
                MailOutboxRepository(database),
                mailer,
                sender=settings.mail_from,
                valid_for={
                    VERIFY_EMAIL: _in_words(settings.verification_ttl),
                    RESET_PASSWORD: _in_words(settings.reset_ttl),
                },
                backoff=backoff,
                poll_interval=settings.outbox_poll_interval,
                call_timeout=settings.smtp_timeout,
                registry=app[METRICS_REGISTRY],
            )
            relays.append(sending)
            woken.insert(0, sending)
        else:
            log.warning("no AUTH_SMTP_URL (dev mode): mails stay in auth.mail_outbox, unsent")
        app[RELAYS] = relays
        app[AUTH_SERVICE] = AuthService(
            uow=PostgresUnitOfWork(
                database, referral_lease=relay.lease, webhook_endpoints=settings.webhook_urls
            ),
            users=UserRepository(database),
            refresh_tokens=RefreshTokenRepository(database),
            identities=IdentityRepository(database),
            hasher=hasher,
            issuer=issuer,
            throttle=LoginThrottle(
                app[REDIS],
                prefix=settings.redis_prefix,
                limits=ThrottleLimits(
                    per_account_address=settings.login_max_failures_per_account_address,
                    account_address_window=settings.login_account_address_window,
                    per_address=settings.login_max_failures_per_address,
                    address_window=settings.login_address_window,
                ),
                registry=app[METRICS_REGISTRY],
            ),
            refresh_ttl=timedelta(seconds=settings.refresh_token_ttl),
            referrals=referrals,
            referral_exports=referrals,
            referral_delivery=ImmediateReferralDelivery(relay),
            ownership=OwnershipMail(
                app_url=settings.pages_url,
                verification_ttl=timedelta(seconds=settings.verification_ttl),
                reset_ttl=timedelta(seconds=settings.reset_ttl),
                relays=woken,
            ),
            mail_limiter=MailLimiter(
                app[REDIS], prefix=settings.redis_prefix, limits=MailLimits(), registry=app[METRICS_REGISTRY]
            ),
            email_verifier=app.get(EMAIL_VERIFIER),
            enrichment=app.get(ENRICHMENT_SCHEDULER),
            block_disposable=settings.block_disposable,
            deny_list=deny_list,
            erasure_delivery=ImmediateErasureDelivery(erasures),
            # The longest access token, the verifiers' clock leeway, and a margin for clocks apart.
            deny_for=timedelta(seconds=settings.access_token_ttl + 30 + 90),
        )
        try:
            yield
        finally:
            await deny_list.stop()
            executor.shutdown(wait=True, cancel_futures=True)

    return ctx


def _oauth_ctx(settings: AuthSettings) -> CleanupContext:
    """Sign-in through the configured providers (none configured: every provider name is 404)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[OAUTH_SERVICE] = OAuthService(
            auth=app[AUTH_SERVICE],
            providers={p.name: create_provider(p, app[HTTP_CLIENT]) for p in settings.oauth},
            states=OAuthStateStore(app[CACHE], prefix=settings.redis_prefix, ttl=settings.oauth_state_ttl),
            redirect_uri=lambda name: (
                f"{settings.public_base_url.rstrip('/')}{API_PREFIX}/oauth/{name}/callback"
            ),
        )
        yield

    return ctx


def create_app(settings: AuthSettings) -> web.Application:
    """Build the auth service; resources open on startup and close on cleanup."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    setup_common(app, CollectorRegistry(), user_verifier=TOKEN_VERIFIER, cors_origins=settings.cors_origins)
    app[SETTINGS] = settings
    ring = load_key_ring(settings)
    app[KEY_RING] = ring
    app[TRUSTED_PROXIES] = parse_networks(settings.trusted_proxies)
    app[TOKEN_VERIFIER] = TokenVerifier(
        StaticKeySource(ring.public_keys), issuer=settings.issuer, audience=settings.token_audience
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
    app.cleanup_ctx.append(aiocache_ctx(settings.redis_url, timeout=settings.redis_timeout))
    # Each client bounds its own calls (referral service, Hunter, enrichment, providers); this is the net.
    app.cleanup_ctx.append(http_client_ctx(timeout=30.0, user_agent=USER_AGENT))
    # Before the service that uses them; closed after it, and before the HTTP session and the pool.
    app.cleanup_ctx.append(_email_verifier_ctx(settings))
    app.cleanup_ctx.append(_enrichment_ctx(settings))
    app.cleanup_ctx.append(_auth_service_ctx(settings))
    app.cleanup_ctx.append(_oauth_ctx(settings))
    app.cleanup_ctx.append(_relays_ctx)
    app.cleanup_ctx.append(
        webhooks_ctx(settings, webhook_outbox_table, metric_prefix="auth", user_agent=USER_AGENT)
    )
    app.cleanup_ctx.append(idempotency_ctx(idempotency_keys_table, lease=settings.idempotency_lease))
    add_routes(app)
    setup_openapi(
        app,
        prefix=API_PREFIX,
        title="Auth service",
        version="1.0.0",
        description=DESCRIPTION,
        token_url=f"{API_PREFIX}/token",
        schemas={"OAuthError": OAuthErrorSchema},
    )
    return app
