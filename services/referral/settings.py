"""The referral service's settings, read from `REFERRAL_*` variables (and the shared unprefixed ones)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import DEV, SettingsError, setting
from shared.cors import check_origins
from shared.serving import check_shutdown
from shared.webhooks import check_webhook_settings

PREFIX = "REFERRAL_"
API_PREFIX = "/api/v1/referral"
INTERNAL_PREFIX = "/internal/v1"


@dataclass(frozen=True, kw_only=True)
class ReferralSettings:
    """Everything the referral service can be configured with; see `.env.example`."""

    env: str = setting("production", doc="dev or production")
    host: str = setting("127.0.0.1", doc="address to listen on")
    port: int = setting(8082, doc="port to listen on")
    shutdown_drain: float = setting(
        5.0, doc="seconds a stopping process keeps its open connections for their clients (shared/serving.py)"
    )
    shutdown_timeout: float = setting(15.0, doc="seconds a stopping process then gives requests in flight")
    database_url: str = setting(sensitive=True, env="DATABASE_URL", doc="PostgreSQL URL (schema referral)")
    redis_url: str = setting(sensitive=True, env="REDIS_URL", doc="Redis URL")
    redis_prefix: str = setting("referral:", doc="prefix of every Redis key this service writes")
    deny_list_prefix: str = setting(
        "deny-list:", doc="prefix of the erased subjects' Redis key and channel: the same in both services"
    )
    deny_list_ttl: int = setting(
        1020, doc="seconds an erased user's tokens stay refused: at least the longest access token's life"
    )
    auth_jwks_url: str = setting(
        "http://127.0.0.1:8081/api/v1/auth/.well-known/jwks.json", doc="the auth service's JWKS"
    )
    auth_issuer: str = setting("http://127.0.0.1:8080/api/v1/auth", doc="`iss` of the auth service's tokens")
    token_audience: str = setting("referral-system", doc="`aud` of user access tokens")
    internal_audience: str = setting("referral-service", doc="`aud` of service tokens for /internal/")
    internal_scope: str = setting("referrals:internal", doc="scope a service token needs for /internal/")
    code_min_lifetime: int = setting(60, doc="seconds a new code must at least live")
    code_max_lifetime_days: int = setting(365, doc="days a new code may at most live")
    cache_ttl: int = setting(300, doc="seconds a cached code lives at most (never past its expiry)")
    negative_cache_ttl: int = setting(30, doc="seconds an unknown email or code stays cached")
    near_cache_size: int = setting(
        50_000, doc="lookups by email kept in process memory, coherent through Redis tracking; 0: off"
    )
    near_cache_ttl: float = setting(30.0, doc="seconds a lookup stays in process memory at most")
    db_pool_min: int = setting(2, doc="connections opened at start")
    db_pool_max: int = setting(16, doc="most connections per process")
    db_timeout: float = setting(5.0, doc="seconds to wait for a connection or a statement")
    db_server_prepare: bool = setting(
        True, doc="PREPARE hot statements once per connection; false behind a transaction-mode pooler"
    )
    idempotency_lease: float = setting(
        60.0, doc="seconds after which a request holding an Idempotency-Key counts as abandoned"
    )
    redis_timeout: float = setting(0.5, doc="seconds to wait for Redis before reading the database")
    max_body_bytes: int = setting(16 * 1024, doc="largest request body accepted")
    cors_origins: tuple[str, ...] = setting((), doc="exact browser origins allowed by CORS; empty: CORS off")
    stats_depth: int = setting(3, doc="levels of referrals a referrer's statistics show (1 to 5)")
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
        if self.env not in (DEV, "production"):
            raise SettingsError(f"{PREFIX}ENV must be dev or production")
        check_shutdown(self.shutdown_drain, self.shutdown_timeout, PREFIX)
        if not 8 <= self.db_pool_max <= 500 or self.db_pool_min > self.db_pool_max:
            raise SettingsError(f"{PREFIX}DB_POOL_MAX must be 8..500 and at least {PREFIX}DB_POOL_MIN")
        if self.code_min_lifetime < 1 or self.code_max_lifetime_days < 1:
            raise SettingsError(
                f"{PREFIX}CODE_MIN_LIFETIME and {PREFIX}CODE_MAX_LIFETIME_DAYS must be positive"
            )
        if self.near_cache_size < 0 or self.near_cache_ttl <= 0:
            raise SettingsError(f"{PREFIX}NEAR_CACHE_SIZE must be >= 0 and {PREFIX}NEAR_CACHE_TTL > 0")
        check_origins(self.cors_origins, f"{PREFIX}CORS_ORIGINS")
        # The database counts levels 1 to 5 (migration 0006): a deeper setting would show zeros.
        if not 1 <= self.stats_depth <= 5:
            raise SettingsError(f"{PREFIX}STATS_DEPTH must be 1 to 5")
        check_webhook_settings(PREFIX, self)
