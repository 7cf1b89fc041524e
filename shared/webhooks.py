"""Events out: webhooks in the Standard Webhooks format (API.md "Events out: webhooks"), for both services.

An event is written by the change it reports, in the change's own transaction (`WebhookEvents.publish`):
one row of the service's `webhook_outbox` table per configured endpoint, so each endpoint is retried on
its own. No endpoint configured: nothing is written. The relay of shared/outbox.py (`WebhookRelay`)
delivers the rows at least once: several replicas never send the same row at the same moment (the
claim's SKIP LOCKED and lease), a failure is retried with exponential backoff and jitter, and a row
still undelivered 24 hours after its event is marked failed (the `failed` outcomes of the metric and
one error line).

Each attempt is a POST of the event's body, `{"type", "timestamp", "data"}`, the same bytes every time,
with the headers `webhook-id` (the event's id: the same on every retry and for every endpoint, so a
receiver drops duplicates), `webhook-timestamp` (the attempt's time) and `webhook-signature`
(`v1,` + base64 HMAC-SHA256, signed by `standardwebhooks.Webhook`). A 2xx answer within the timeout
(10 s by default) is a delivery; redirects are not followed, so a 3xx is not one. Anything else is
retried.

Targets inside the network are refused unless `*_WEBHOOK_ALLOW_PRIVATE=true`: an endpoint whose host is
a literal loopback, private, link-local (any non-global) address is a configuration error at startup
(`check_webhook_settings`); a host name is resolved at each connection by `PublicOnlyResolver`, which
drops every non-global address it gets, so the connection goes to an address that was checked (no DNS
rebinding window between the check and the connect). A name with no public address left is a
permanent failure of that row (an error line naming the event and the endpoint's origin, never the
secret or the endpoint's path and query).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import CheckConstraint, Column, Index, MetaData, Table, Text, Uuid, text
from standardwebhooks import Webhook
from yarl import URL

from shared.appkeys import DATABASE, METRICS_REGISTRY
from shared.config import SettingsError
from shared.db import prepare_sql
from shared.outbox import Backoff, OutboxRelay, PermanentFailure, TemporaryFailure
from shared.outbox_store import PENDING, Executor, OutboxStatements, TableOutbox, delivery_columns
from shared.resources import CleanupContext

log = logging.getLogger(__name__)

TABLE_NAME = "webhook_outbox"
SECRET_PREFIX = "whsec_"  # noqa: S105 (the prefix, not a secret)
MIN_SECRET_BYTES = 16
DEFAULT_TIMEOUT = 10.0
# Retried for this long after the event, then recorded as failed (API.md).
GIVE_UP_AFTER = timedelta(hours=24)


def webhook_outbox_table(metadata: MetaData) -> Table:
    """The service's webhook outbox (its migration creates it): one row per (event, endpoint)."""
    table = Table(
        TABLE_NAME,
        metadata,
        Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
        Column("event_id", Uuid, nullable=False),
        Column("event_type", Text, nullable=False),
        Column("endpoint", Text, nullable=False),
        # NULL once the row is settled (delivered, or failed for good): an event names people, and
        # a sent one is kept only as bookkeeping (an erased user leaves nothing behind here).
        Column("body", Text),
        *delivery_columns(TABLE_NAME),
        CheckConstraint(
            "body IS NOT NULL OR delivered_at IS NOT NULL OR failed_at IS NOT NULL",
            name=f"{TABLE_NAME}_pending_has_body",
        ),
    )
    Index(f"{TABLE_NAME}_pending_idx", table.c.next_attempt_at, postgresql_where=text(PENDING))
    # The age of the oldest undelivered event (the metric) is one probe of this index.
    Index(f"{TABLE_NAME}_oldest_idx", table.c.created_at, postgresql_where=text(PENDING))
    return table


# --- writing events --------------------------------------------------------------------------------


def encode_event(event_type: str, timestamp: datetime, data: Mapping[str, Any]) -> str:
    """The body of an event: `{"type", "timestamp", "data"}`; UUIDs as text, times in RFC 3339 (UTC, Z)."""
    payload = {"type": event_type, "timestamp": timestamp, "data": dict(data)}
    return orjson.dumps(payload, option=orjson.OPT_UTC_Z).decode()


class WebhookEvents:
    """Publishes events in the transaction whose connection it is given: one outbox row per endpoint.

    With no endpoint configured, `publish` writes nothing (and costs nothing)."""

    def __init__(self, conn: Executor, table: Table, endpoints: Sequence[str]) -> None:
        self._conn = conn
        self._endpoints = list(endpoints)
        self._insert = _insert_statement(table)

    async def publish(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Write the event `event_type` with `data` (JSON: UUIDs and datetimes are fine)."""
        if not self._endpoints:
            return
        body = encode_event(event_type, datetime.now(UTC), data)
        await self._conn.execute(
            self._insert,
            {"event_id": uuid.uuid4(), "event_type": event_type, "body": body, "endpoints": self._endpoints},
        )


_INSERTS: dict[str, Any] = {}


def _insert_statement(table: Table) -> Any:
    """One INSERT of an event's rows, for all the endpoints at once (compiled once per table)."""
    name = f"{table.schema}.{table.name}"
    if name not in _INSERTS:
        _INSERTS[name] = prepare_sql(
            f"INSERT INTO {name} (event_id, event_type, endpoint, body) "  # noqa: S608 (a table name)
            "SELECT %(event_id)s::uuid, %(event_type)s::text, endpoint, %(body)s::text "
            "FROM unnest(%(endpoints)s::text[]) AS endpoint"
        )
    return _INSERTS[name]


# --- the outbox ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookMessage:
    """One event for one endpoint: what an attempt sends."""

    id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    endpoint: str
    body: str
    created_at: datetime


def _message(row: Mapping[str, Any]) -> WebhookMessage:
    return WebhookMessage(
        row["id"], row["event_id"], row["event_type"], row["endpoint"], row["body"], row["created_at"]
    )


_STATEMENTS: dict[str, OutboxStatements] = {}


class WebhookOutbox(TableOutbox[WebhookMessage]):
    """The relay's store over a service's `webhook_outbox` table."""

    def __init__(self, database: Executor, table: Table) -> None:
        name = f"{table.schema}.{table.name}"
        if name not in _STATEMENTS:
            _STATEMENTS[name] = OutboxStatements(
                table, "id", on_delivered={"body": None}, on_failed={"body": None}
            )
        super().__init__(database, _STATEMENTS[name], "id", _message)


# --- the targets -----------------------------------------------------------------------------------


class TargetRefused(OSError):
    """The endpoint's host has no public address (loopback, private, link-local...): not contacted."""


def is_public(address: str) -> bool:
    """Whether the IP address is a global one (an IPv4-mapped IPv6 address is judged as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def literal_ip(host: str) -> str | None:
    """The host as an IP address when it is one (`[::1]` included), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, keeping only global addresses: the connector then connects only to those."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [result for result in results if is_public(result["host"])]
        if not public:
            raise TargetRefused(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def origin(endpoint: str) -> str:
    """What the logs say of an endpoint: scheme, host and port (its path or query may hold a token)."""
    try:
        return str(URL(endpoint).origin())
    except ValueError:
        return "(invalid URL)"


class WebhookSettings(Protocol):
    """The `*_WEBHOOK_*` settings both services have."""

    @property
    def webhook_urls(self) -> tuple[str, ...]: ...
    @property
    def webhook_secret(self) -> str | None: ...
    @property
    def webhook_allow_private(self) -> bool: ...
    @property
    def webhook_timeout(self) -> float: ...
    @property
    def webhook_max_backoff(self) -> float: ...
    @property
    def webhook_poll_interval(self) -> float: ...


def check_webhook_settings(prefix: str, settings: WebhookSettings) -> None:
    """SettingsError unless every URL is http(s) with a host (a public literal address, unless private
    targets are allowed), with URLs the secret is a valid `whsec_` one, and the times are in range."""
    if not 0 < settings.webhook_timeout <= 60:
        raise SettingsError(f"{prefix}WEBHOOK_TIMEOUT must be more than 0 and at most 60 seconds")
    if not 0 < settings.webhook_poll_interval <= 3600 or not 0.5 <= settings.webhook_max_backoff <= 86400:
        raise SettingsError(
            f"{prefix}WEBHOOK_POLL_INTERVAL must be 0..3600 seconds"
            f" and {prefix}WEBHOOK_MAX_BACKOFF 0.5..86400 seconds"
        )
    for url in settings.webhook_urls:
        try:
            parsed = URL(url)
        except ValueError:
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise SettingsError(f"{prefix}WEBHOOK_URLS must be http(s) URLs with a host")
        address = literal_ip(parsed.host)
        if address is not None and not settings.webhook_allow_private and not is_public(address):
            raise SettingsError(
                f"{prefix}WEBHOOK_URLS: {origin(url)} is a loopback, private or link-local address;"
                f" set {prefix}WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
    if settings.webhook_urls:
        check_secret(prefix, settings.webhook_secret)


def check_secret(prefix: str, secret: str | None) -> None:
    """SettingsError unless `secret` is `whsec_` + base64 of at least 16 bytes (never in the message)."""
    if not secret:
        raise SettingsError(f"{prefix}WEBHOOK_SECRET is required when {prefix}WEBHOOK_URLS is set")
    if not secret.startswith(SECRET_PREFIX):
        raise SettingsError(f"{prefix}WEBHOOK_SECRET must start with {SECRET_PREFIX}")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(f"{prefix}WEBHOOK_SECRET must be {SECRET_PREFIX} + base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise SettingsError(f"{prefix}WEBHOOK_SECRET must hold at least {MIN_SECRET_BYTES} bytes")


# --- sending ---------------------------------------------------------------------------------------


class WebhookSender:
    """Signs and POSTs one message; `send` answers "delivered" or raises the relay's failures.

    Its HTTP session is its own: a connector that resolves through `PublicOnlyResolver` (unless
    private targets are allowed), no redirects, no cookies, no proxy from the environment."""

    def __init__(
        self, secret: str, *, timeout: float = DEFAULT_TIMEOUT, allow_private: bool, user_agent: str
    ) -> None:
        self._signer = Webhook(secret)
        self.timeout = timeout
        self._allow_private = allow_private
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebhookSender:
        resolver = DefaultResolver() if self._allow_private else PublicOnlyResolver()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(
                limit=100, keepalive_timeout=30, ttl_dns_cache=60, resolver=resolver
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": self._user_agent},
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self, message: WebhookMessage, now: datetime) -> dict[str, str]:
        """The Standard Webhooks headers of one attempt made at `now`."""
        msg_id = str(message.event_id)
        return {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(msg_id, now, message.body),
        }

    async def send(self, message: WebhookMessage) -> str:
        """One attempt: "delivered" on a 2xx; PermanentFailure for a refused target; else TemporaryFailure."""
        if self._session is None:
            raise RuntimeError("WebhookSender used outside its `async with`")
        if not self._allow_private:
            address = literal_ip(URL(message.endpoint).host or "")
            if address is not None and not is_public(address):
                raise PermanentFailure("target refused: not a public address")
        headers = self.headers(message, datetime.now(UTC))
        try:
            async with self._session.post(
                message.endpoint, data=message.body.encode(), headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, TargetRefused):
                raise PermanentFailure("target refused: its name resolves to no public address") from None
            raise TemporaryFailure("name not resolved") from None
        except TimeoutError:
            raise TemporaryFailure(f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise TemporaryFailure(type(error).__name__) from None
        if 200 <= status < 300:
            return "delivered"
        if 300 <= status < 400:
            raise TemporaryFailure(f"HTTP {status}: redirects are not followed")
        raise TemporaryFailure(f"HTTP {status}")


class WebhookRelay(OutboxRelay[WebhookMessage]):
    """The relay of a service's webhook outbox, with its metrics on /metrics:

    `<prefix>_webhook_deliveries_total{outcome}`: `delivered`, `retry` (an attempt failed, retried
    later), `refused` and `gave_up` (failed for good: a refused target, or 24 hours without delivery);
    `<prefix>_webhook_oldest_pending_seconds`: the age of the oldest undelivered event, after each pass.
    """

    def __init__(
        self,
        outbox: WebhookOutbox,
        sender: WebhookSender,
        *,
        metric_prefix: str,
        registry: CollectorRegistry,
        backoff: Backoff,
        poll_interval: float,
        give_up_after: timedelta = GIVE_UP_AFTER,
    ) -> None:
        super().__init__(
            "webhook",
            outbox,
            sender.send,
            backoff=backoff,
            poll_interval=poll_interval,
            call_timeout=sender.timeout,
            registry=registry,
            metric=f"{metric_prefix}_webhook_deliveries",
            describe=lambda message: {
                "event_id": str(message.event_id),
                "event_type": message.event_type,
                "endpoint": origin(message.endpoint),
            },
            give_up_after=give_up_after,
        )
        self._outbox = outbox
        self._oldest = Gauge(
            f"{metric_prefix}_webhook_oldest_pending_seconds",
            "Age of the oldest webhook event not yet delivered (0: none), as of the relay's last pass",
            registry=registry,
        )

    async def run_once(self) -> int:
        claimed = await super().run_once()
        self._oldest.set(await self._outbox.oldest_pending_age())
        return claimed


# --- wiring ----------------------------------------------------------------------------------------


WEBHOOK_RELAY = web.AppKey("webhook_relay", WebhookRelay)


def webhooks_ctx(
    settings: WebhookSettings, table: Table, *, metric_prefix: str, user_agent: str
) -> CleanupContext:
    """The webhook relay of a service, running while the app runs (nothing when no URL is configured):
    at shutdown the attempts in flight finish (bounded by the timeout), then its session closes."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if not settings.webhook_urls or not settings.webhook_secret:
            yield
            return
        sender = WebhookSender(
            settings.webhook_secret,
            timeout=settings.webhook_timeout,
            allow_private=settings.webhook_allow_private,
            user_agent=user_agent,
        )
        async with sender:
            relay = WebhookRelay(
                WebhookOutbox(app[DATABASE], table),
                sender,
                metric_prefix=metric_prefix,
                registry=app[METRICS_REGISTRY],
                backoff=Backoff(maximum=settings.webhook_max_backoff),
                poll_interval=settings.webhook_poll_interval,
            )
            app[WEBHOOK_RELAY] = relay
            relay.start()
            try:
                yield
            finally:
                await relay.stop()

    return ctx
