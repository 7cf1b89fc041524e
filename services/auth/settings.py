"""The auth service's settings, read from `AUTH_*` variables (and the shared unprefixed ones)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from shared.config import DEV, SettingsError, setting

PREFIX = "AUTH_"
API_PREFIX = "/api/v1/auth"


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """Everything the auth service can be configured with; see `.env.example`."""

    env: str = setting("production", doc="dev or production; dev allows a generated signing key")
    host: str = setting("127.0.0.1", doc="address to listen on")
    port: int = setting(8081, doc="port to listen on")
    database_url: str = setting(env="DATABASE_URL", doc="PostgreSQL URL (schema auth)")
    redis_url: str = setting(env="REDIS_URL", doc="Redis URL")
    redis_prefix: str = setting("auth:", doc="prefix of every Redis key this service writes")
    public_base_url: str = setting("http://127.0.0.1:8080", doc="the gateway's public URL, for iss")
    jwt_private_keys: str | None = setting(None, doc="PEM text: the signing key first, then older keys")
    jwt_private_keys_file: str | None = setting(None, doc="path of a PEM file, same content")
    token_audience: str = setting("referral-system", doc="aud of user access tokens")
    access_token_ttl: int = setting(900, doc="access token lifetime, seconds")
    refresh_token_ttl: int = setting(30 * 24 * 3600, doc="refresh token lifetime, seconds")
    db_pool_min: int = setting(2, doc="connections opened at start")
    db_pool_max: int = setting(32, doc="most connections per process")
    db_timeout: float = setting(5.0, doc="seconds to wait for a connection or a statement")
    redis_timeout: float = setting(1.0, doc="seconds to wait for Redis")
    max_body_bytes: int = setting(64 * 1024, doc="largest request body accepted")
    argon2_time_cost: int = setting(3, doc="argon2id passes")
    argon2_memory_kib: int = setting(65536, doc="argon2id memory, KiB")
    argon2_parallelism: int = setting(4, doc="argon2id lanes")
    hash_workers: int = setting(os.cpu_count() or 2, doc="threads hashing passwords")
    login_max_failures_per_account: int = setting(5, doc="failed logins per account before 429")
    login_max_failures_per_address: int = setting(50, doc="failed logins per client address before 429")
    login_lockout_seconds: int = setting(300, doc="how long failures are counted and a lockout lasts")
    trusted_proxies: tuple[str, ...] = setting((), doc="addresses whose X-Forwarded-For is believed")
    referral_service_url: str = setting("http://127.0.0.1:8082", doc="the referral service's own base URL")
    referral_audience: str = setting("referral-service", doc="aud of the tokens this service calls it with")
    referral_timeout: float = setting(2.0, doc="seconds any call to the referral service may take")
    outbox_max_backoff: float = setting(60.0, doc="longest wait between two deliveries of one link, seconds")
    outbox_poll_interval: float = setting(1.0, doc="seconds between two looks at the referral outbox")
    log_level: str = setting("INFO", doc="logging level")

    def __post_init__(self) -> None:
        if self.env != DEV and not (self.jwt_private_keys or self.jwt_private_keys_file):
            raise SettingsError(
                f"{PREFIX}JWT_PRIVATE_KEYS or {PREFIX}JWT_PRIVATE_KEYS_FILE is required outside dev mode"
            )
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

    @property
    def issuer(self) -> str:
        """`iss` of every token: the auth API's public base, where discovery lives."""
        return self.public_base_url.rstrip("/") + API_PREFIX

    @property
    def is_dev(self) -> bool:
        return self.env == DEV
