"""The auth service's settings, read from `AUTH_*` variables (and the shared unprefixed ones)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.auth.adapters.oauth.config import OAuthProviderSettings, load_oauth_providers
from shared.config import DEV, SettingsError, load_settings, setting
from shared.cors import check_origins
from shared.serving import check_shutdown
from shared.webhooks import check_webhook_settings

PREFIX = "AUTH_"
API_PREFIX = "/api/v1/auth"


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """Everything the auth service can be configured with; see `.env.example`."""

    env: str = setting("production", doc="dev or production; dev allows a generated signing key")
    host: str = setting("127.0.0.1", doc="address to listen on")
    port: int = setting(8081, doc="port to listen on")
    shutdown_drain: float = setting(
        5.0, doc="seconds a stopping process keeps its open connections for their clients (shared/serving.py)"
    )
    shutdown_timeout: float = setting(15.0, doc="seconds a stopping process then gives requests in flight")
    database_url: str = setting(sensitive=True, env="DATABASE_URL", doc="PostgreSQL URL (schema auth)")
    redis_url: str = setting(sensitive=True, env="REDIS_URL", doc="Redis URL")
    redis_prefix: str = setting("auth:", doc="prefix of every Redis key this service writes")
    deny_list_prefix: str = setting(
        "deny-list:", doc="prefix of the erased subjects' Redis key and channel: the same in both services"
    )
    public_base_url: str = setting("http://127.0.0.1:8080", doc="the gateway's public URL, for iss")
    jwt_private_keys: str | None = setting(
        None, sensitive=True, doc="PEM text: the signing key first, then older keys"
    )
    jwt_private_keys_file: str | None = setting(None, doc="path of a PEM file, same content")
    token_audience: str = setting("referral-system", doc="aud of user access tokens")
    access_token_ttl: int = setting(900, doc="access token lifetime, seconds")
    refresh_token_ttl: int = setting(30 * 24 * 3600, doc="refresh token lifetime, seconds")
    db_pool_min: int = setting(2, doc="connections opened at start")
    db_pool_max: int = setting(16, doc="most connections per process")
    db_timeout: float = setting(5.0, doc="seconds to wait for a connection or a statement")
    db_server_prepare: bool = setting(
        True, doc="PREPARE hot statements once per connection; false behind a transaction-mode pooler"
    )
    idempotency_lease: float = setting(
        60.0, doc="seconds after which a request holding an Idempotency-Key counts as abandoned"
    )
    redis_timeout: float = setting(1.0, doc="seconds to wait for Redis")
    max_body_bytes: int = setting(64 * 1024, doc="largest request body accepted")
    argon2_time_cost: int = setting(3, doc="argon2id passes")
    argon2_memory_kib: int = setting(65536, doc="argon2id memory, KiB")
    argon2_parallelism: int = setting(4, doc="argon2id lanes")
    hash_workers: int = setting(os.cpu_count() or 2, doc="threads hashing passwords")
    hash_nice: int = setting(
        10, doc="nice value of the hashing threads (0-19): the event loop's thread is scheduled first"
    )
    login_max_failures_per_account_address: int = setting(
        5, doc="failed logins of one account from one client address before 429"
    )
    login_account_address_window: int = setting(
        900, doc="seconds those failures count, from the first (and a lockout lasts at most)"
    )
    login_max_failures_per_address: int = setting(50, doc="failed logins from one client address before 429")
    login_address_window: int = setting(300, doc="seconds those failures count, from the first")
    trusted_proxies: tuple[str, ...] = setting(
        ("127.0.0.1", "::1"), doc="proxies (addresses, networks) whose X-Forwarded-For is believed"
    )
    cors_origins: tuple[str, ...] = setting((), doc="exact browser origins allowed by CORS; empty: CORS off")
    referral_service_url: str = setting("http://127.0.0.1:8082", doc="the referral service's own base URL")
    referral_audience: str = setting("referral-service", doc="aud of the tokens this service calls it with")
    referral_timeout: float = setting(2.0, doc="seconds any call to the referral service may take")
    outbox_max_backoff: float = setting(60.0, doc="longest wait between two deliveries of one link, seconds")
    outbox_poll_interval: float = setting(1.0, doc="seconds between two looks at the referral outbox")
    hunter_api_key: str | None = setting(
        None, sensitive=True, doc="Hunter Email Verifier key; unset: no email check"
    )
    hunter_base_url: str = setting("https://api.hunter.io", doc="Hunter API base URL")
    hunter_timeout: float = setting(3.0, doc="seconds one call to Hunter may take")
    hunter_max_polls: int = setting(3, doc="most calls to Hunter per check while it answers 202")
    hunter_poll_interval: float = setting(1.0, doc="seconds between two calls while Hunter answers 202")
    email_check_cache_ttl: int = setting(7 * 24 * 3600, doc="seconds a verdict is cached per email; 0: none")
    enrichment_api_key: str | None = setting(
        None, sensitive=True, doc="Clearbit-compatible Person API key; unset: none"
    )
    enrichment_base_url: str = setting("https://person.clearbit.com", doc="Person API base URL")
    enrichment_timeout: float = setting(5.0, doc="seconds one call to the Person API may take")
    enrichment_max_attempts: int = setting(3, doc="most calls per user while the Person API answers 202")
    enrichment_retry_delay: float = setting(2.0, doc="seconds between two calls while it answers 202")
    enrichment_concurrency: int = setting(4, doc="enrichments running at once per process")
    enrichment_shutdown_grace: float = setting(5.0, doc="seconds shutdown waits for enrichments in flight")
    smtp_url: str | None = setting(
        None,
        sensitive=True,
        doc="the mail server: smtp://user:password@host:587 (STARTTLS) or smtps://...; required outside dev",
    )
    smtp_timeout: float = setting(10.0, doc="seconds one SMTP delivery may take")
    mail_from: str = setting("Referral system <no-reply@localhost>", doc="the From of the mails")
    app_url: str | None = setting(
        None, doc="the front end that mail links point to; default: the service's own pages"
    )
    verification_ttl: int = setting(24 * 3600, doc="seconds a verification link lives")
    reset_ttl: int = setting(30 * 60, doc="seconds a password reset link lives")
    oauth_state_ttl: int = setting(600, doc="seconds a provider sign-in may take from authorize to callback")
    oauth: tuple[OAuthProviderSettings, ...] = setting(
        (), derived=True, doc="AUTH_OAUTH_PROVIDERS and AUTH_OAUTH_<NAME>_*"
    )
    block_disposable: bool = setting(
        True, doc="refuse signups from disposable-address domains (a maintained list), verifier or not"
    )
    webhook_urls: tuple[str, ...] = setting(
        (), sensitive=True, doc="comma-separated webhook endpoints; none: no event is written"
    )
    webhook_secret: str | None = setting(
        None, sensitive=True, doc="the Standard Webhooks signing secret (whsec_ + base64); required with URLs"
    )
    webhook_allow_private: bool = setting(
        False, doc="allow webhook targets on loopback, private or link-local addresses"
    )
    webhook_timeout: float = setting(10.0, doc="seconds a webhook endpoint has to answer 2xx")
    webhook_max_backoff: float = setting(
        3600.0, doc="longest wait between two attempts of one webhook, seconds"
    )
    webhook_poll_interval: float = setting(1.0, doc="seconds between two looks at the webhook outbox")
    log_level: str = setting("INFO", doc="logging level")

    def __post_init__(self) -> None:
        if self.env != DEV and not (self.jwt_private_keys or self.jwt_private_keys_file):
            raise SettingsError(
                f"{PREFIX}JWT_PRIVATE_KEYS or {PREFIX}JWT_PRIVATE_KEYS_FILE is required outside dev mode"
            )
        if not 0 <= self.hash_nice <= 19:
            raise SettingsError(f"{PREFIX}HASH_NICE must be 0..19")
        limits = (self.login_max_failures_per_account_address, self.login_max_failures_per_address)
        windows = (self.login_account_address_window, self.login_address_window)
        if min(limits) < 1 or not all(1 <= window <= 86400 for window in windows):
            raise SettingsError(
                f"{PREFIX}LOGIN_MAX_FAILURES_* must be at least 1 and the LOGIN_*_WINDOW 1..86400 seconds"
            )
        check_shutdown(self.shutdown_drain, self.shutdown_timeout, PREFIX)
        if not 8 <= self.db_pool_max <= 500 or self.db_pool_min > self.db_pool_max:
            raise SettingsError(f"{PREFIX}DB_POOL_MAX must be 8..500 and at least {PREFIX}DB_POOL_MIN")
        if not self.referral_service_url.startswith(("http://", "https://")):
            raise SettingsError(f"{PREFIX}REFERRAL_SERVICE_URL must be an http(s) URL")
        if not 0 < self.referral_timeout <= 60:
            raise SettingsError(f"{PREFIX}REFERRAL_TIMEOUT must be more than 0 and at most 60 seconds")
        if not 0 < self.outbox_poll_interval <= 3600 or not 0.5 <= self.outbox_max_backoff <= 86400:
            raise SettingsError(
                f"{PREFIX}OUTBOX_POLL_INTERVAL must be 0..3600 seconds"
                f" and {PREFIX}OUTBOX_MAX_BACKOFF 0.5..86400 seconds"
            )
        if self.env != DEV and not self.smtp_url:
            raise SettingsError(f"{PREFIX}SMTP_URL is required outside dev mode: mails must go somewhere")
        if self.app_url is not None and not self.app_url.startswith(("http://", "https://")):
            raise SettingsError(f"{PREFIX}APP_URL must be an http(s) URL")
        if not (60 <= self.verification_ttl <= 30 * 86400 and 60 <= self.reset_ttl <= 86400):
            raise SettingsError(
                f"{PREFIX}VERIFICATION_TTL must be 60 s..30 days and {PREFIX}RESET_TTL 60 s..1 day"
            )
        if not 0 < self.smtp_timeout <= 120:
            raise SettingsError(f"{PREFIX}SMTP_TIMEOUT must be more than 0 and at most 120 seconds")
        if not 30 <= self.oauth_state_ttl <= 3600:
            raise SettingsError(f"{PREFIX}OAUTH_STATE_TTL must be 30..3600 seconds")
        check_origins(self.cors_origins, f"{PREFIX}CORS_ORIGINS")
        check_webhook_settings(PREFIX, self)
        self._check_vendors()

    def _check_vendors(self) -> None:
        for name, url in (("HUNTER", self.hunter_base_url), ("ENRICHMENT", self.enrichment_base_url)):
            if not url.startswith(("http://", "https://")):
                raise SettingsError(f"{PREFIX}{name}_BASE_URL must be an http(s) URL")
        if not (0 < self.hunter_timeout <= 60 and 0 < self.enrichment_timeout <= 60):
            raise SettingsError(
                f"{PREFIX}HUNTER_TIMEOUT and {PREFIX}ENRICHMENT_TIMEOUT must be 0..60 seconds"
            )
        if not (1 <= self.hunter_max_polls <= 20 and 1 <= self.enrichment_max_attempts <= 20):
            raise SettingsError(f"{PREFIX}HUNTER_MAX_POLLS and {PREFIX}ENRICHMENT_MAX_ATTEMPTS must be 1..20")
        if not (0 <= self.hunter_poll_interval <= 60 and 0 <= self.enrichment_retry_delay <= 60):
            raise SettingsError(
                f"{PREFIX}HUNTER_POLL_INTERVAL and {PREFIX}ENRICHMENT_RETRY_DELAY must be 0..60 seconds"
            )
        if self.email_check_cache_ttl < 0:
            raise SettingsError(f"{PREFIX}EMAIL_CHECK_CACHE_TTL must not be negative")
        if not (1 <= self.enrichment_concurrency <= 256 and 0 <= self.enrichment_shutdown_grace <= 300):
            raise SettingsError(
                f"{PREFIX}ENRICHMENT_CONCURRENCY must be 1..256 and {PREFIX}ENRICHMENT_SHUTDOWN_GRACE 0..300"
            )

    @property
    def issuer(self) -> str:
        """`iss` of every token: the auth API's public base, where discovery lives."""
        return self.public_base_url.rstrip("/") + API_PREFIX

    @property
    def pages_url(self) -> str:
        """Where mail links point: `AUTH_APP_URL`, else the service's own pages through the gateway."""
        return self.app_url or self.public_base_url.rstrip("/") + API_PREFIX + "/pages"

    @property
    def is_dev(self) -> bool:
        return self.env == DEV


def load_auth_settings(environ: Mapping[str, str]) -> AuthSettings:
    """The auth service's settings: the `AUTH_*` variables and the sign-in providers they list."""
    return replace(load_settings(AuthSettings, PREFIX, environ), oauth=load_oauth_providers(environ))
