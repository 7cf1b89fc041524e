"""Webhooks out (shared/webhooks.py): the outbox, the relay and the sender against real receivers on
loopback and a real PostgreSQL (the auth service's webhook_outbox table)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from services.auth.adapters.db.tables import webhook_outbox_table
from shared.config import SettingsError
from shared.db import Database, create_database
from shared.outbox import Backoff
from shared.webhooks import (
    PublicOnlyResolver,
    TargetRefused,
    WebhookEvents,
    WebhookMessage,
    WebhookOutbox,
    WebhookRelay,
    WebhookSender,
    check_secret,
    check_webhook_settings,
    is_public,
)
from tests.webhook_receiver import Receiver, new_secret, start_receiver

METRIC = "test_webhook_deliveries_total"
OLDEST = "test_webhook_oldest_pending_seconds"


@pytest.fixture
async def database(database_url: str, db: Any) -> AsyncIterator[Database]:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE auth.webhook_outbox")
    database = await create_database(database_url, minsize=1, maxsize=8, timeout=5.0)
    try:
        yield database
    finally:
        await database.close()


@dataclass
class Relaying:
    relay: WebhookRelay
    registry: CollectorRegistry
    sender: WebhookSender

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def pass_until(self, predicate: Any, timeout: float = 20.0) -> None:
        """Run relay passes until `predicate()` (awaited) holds: each pass claims what is due."""
        async with asyncio.timeout(timeout):
            while True:
                await self.relay.run_once()
                if await predicate():
                    return
                await asyncio.sleep(0.02)


@pytest.fixture
async def relaying(database: Database) -> AsyncIterator[Any]:
    """`await relaying(secret, allow_private=True, timeout=0.5)`: a relay over the auth webhook outbox."""
    opened: list[WebhookSender] = []

    async def make(
        secret: str, *, allow_private: bool = True, timeout: float = 2.0, **kwargs: Any
    ) -> Relaying:
        sender = WebhookSender(secret, timeout=timeout, allow_private=allow_private, user_agent="test")
        await sender.__aenter__()
        opened.append(sender)
        registry = CollectorRegistry()
        relay = WebhookRelay(
            WebhookOutbox(database, webhook_outbox_table),
            sender,
            metric_prefix="test",
            registry=registry,
            backoff=Backoff(base=0.02, maximum=0.1),
            poll_interval=0.05,
            **kwargs,
        )
        return Relaying(relay, registry, sender)

    try:
        yield make
    finally:
        for sender in opened:
            await sender.__aexit__(None, None, None)


async def publish(database: Database, endpoints: list[str], count: int = 1) -> None:
    async with database.transaction() as conn:
        events = WebhookEvents(conn, webhook_outbox_table, endpoints)
        for number in range(count):
            await events.publish(
                "user.created",
                {"user_id": uuid.uuid4(), "number": number, "created_at": datetime(2026, 1, 2, tzinfo=UTC)},
            )


async def rows(database: Database) -> list[Any]:
    return list(await database.fetch_all("SELECT * FROM auth.webhook_outbox ORDER BY created_at, id"))


async def all_delivered(database: Database) -> bool:
    return all(row["delivered_at"] is not None for row in await rows(database))


async def test_every_event_arrives_signed_despite_errors_with_one_id_per_event(
    aiohttp_server: Any, database: Database, relaying: Any
) -> None:
    secret = new_secret()
    # Each event is answered 500 twice, then 200.
    receiver = await start_receiver(
        aiohttp_server, secret, plan=lambda _id, attempt: 500 if attempt <= 2 else 200
    )
    await publish(database, [receiver.url], count=5)
    relaying_ = await relaying(secret)
    relaying_.relay.start()
    try:
        await receiver.wait_for(lambda: len(receiver.delivered_ids()) == 5)
    finally:
        await relaying_.relay.stop()

    written = await rows(database)
    assert {str(row["event_id"]) for row in written} == receiver.delivered_ids()
    assert not receiver.refused
    for event_id in receiver.delivered_ids():
        bodies = [a.body for a in receiver.arrivals if a.webhook_id == event_id]
        assert len(bodies) == 3  # two refused attempts and the delivery, under one webhook-id
        assert len(set(bodies)) == 1  # the same bytes each time
    body = json.loads(receiver.arrivals[0].body)
    assert body["type"] == "user.created"
    assert body["timestamp"].endswith("Z")
    assert body["data"]["created_at"] == "2026-01-02T00:00:00Z"
    async with asyncio.timeout(10):
        while not await all_delivered(database):
            await asyncio.sleep(0.02)
    assert relaying_.metric(METRIC, outcome="delivered") == 5
    assert relaying_.metric(METRIC, outcome="retry") == 10
    # A delivered event keeps no body: it named people, and the row is bookkeeping now.
    assert [row["body"] for row in await rows(database)] == [None] * 5


async def test_one_row_per_endpoint_retried_on_its_own(
    aiohttp_server: Any, database: Database, relaying: Any
) -> None:
    secret = new_secret()
    failing = await start_receiver(aiohttp_server, secret, plan=lambda _id, _attempt: 503)
    working = await start_receiver(aiohttp_server, secret)
    await publish(database, [failing.url, working.url])
    relaying_ = await relaying(secret)
    await relaying_.pass_until(
        lambda: _true_when(lambda: working.delivered_ids() and failing.attempts.total() >= 3)
    )
    assert working.attempts.total() == 1  # delivered once, not retried with the failing endpoint
    assert working.delivered_ids() == set(failing.attempts)  # the same webhook-id at both endpoints


async def _true_when(check: Any) -> bool:
    return bool(check())


async def test_no_endpoint_writes_nothing(database: Database) -> None:
    await publish(database, [], count=3)
    assert await rows(database) == []


async def test_a_hanging_receiver_times_out_and_is_retried(
    aiohttp_server: Any, database: Database, relaying: Any
) -> None:
    secret = new_secret()
    receiver = await start_receiver(
        aiohttp_server, secret, plan=lambda _id, attempt: "hang" if attempt == 1 else 200
    )
    await publish(database, [receiver.url])
    relaying_ = await relaying(secret, timeout=0.5)
    try:
        await relaying_.relay.run_once()  # the first attempt: no answer within 0.5 s
        (row,) = await rows(database)
        assert row["delivered_at"] is None
        assert row["last_error"] == "no answer within 0.5 s"
        assert relaying_.metric(METRIC, outcome="retry") == 1
        await relaying_.pass_until(lambda: all_delivered(database))
    finally:
        receiver.release.set()
    assert receiver.attempts.total() == 2


async def test_two_relays_never_send_the_same_attempt_at_once(
    aiohttp_server: Any, database: Database, relaying: Any
) -> None:
    secret = new_secret()
    receiver = await start_receiver(
        aiohttp_server, secret, plan=lambda _id, attempt: 500 if attempt == 1 else 200
    )
    await publish(database, [receiver.url], count=20)
    first, second = await relaying(secret), await relaying(secret)
    first.relay.start()
    second.relay.start()
    try:
        await receiver.wait_for(lambda: len(receiver.delivered_ids()) == 20)
    finally:
        await asyncio.gather(first.relay.stop(), second.relay.stop())
    assert max(receiver.most_in_flight.values()) == 1
    assert set(receiver.attempts.values()) == {2}  # each event: its refused attempt and its delivery
    sent = sum(r.metric(METRIC, outcome=o) for r in (first, second) for o in ("delivered", "retry"))
    assert sent == 40
    assert first.metric(METRIC, outcome="delivered") > 0 and second.metric(METRIC, outcome="delivered") > 0


async def test_a_redirect_is_not_followed_and_not_a_delivery(
    aiohttp_server: Any, database: Database, relaying: Any
) -> None:
    secret = new_secret()
    receiver = await start_receiver(aiohttp_server, secret, plan=lambda _id, _attempt: 307)
    await publish(database, [receiver.url])
    relaying_ = await relaying(secret)
    await relaying_.relay.run_once()
    (row,) = await rows(database)
    assert row["delivered_at"] is None and row["failed_at"] is None
    assert row["last_error"] == "HTTP 307: redirects are not followed"
    assert receiver.redirected_hits == 0
    assert relaying_.metric(METRIC, outcome="retry") == 1
    assert relaying_.metric(METRIC, outcome="delivered") == 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_private_target_is_refused_unless_allowed(
    aiohttp_server: Any, database: Database, relaying: Any, caplog: pytest.LogCaptureFixture, host: str
) -> None:
    secret = new_secret()
    receiver = await start_receiver(aiohttp_server, secret)
    endpoint = receiver.url.replace("127.0.0.1", host) + "?token=do-not-log"
    await publish(database, [endpoint])
    refusing = await relaying(secret, allow_private=False)
    with caplog.at_level(logging.ERROR, logger="shared.outbox"):
        await refusing.relay.run_once()
    (row,) = await rows(database)
    assert row["failed_at"] is not None  # a permanent failure: never tried again
    assert row["last_error"].startswith("target refused")
    assert receiver.attempts.total() == 0
    assert refusing.metric(METRIC, outcome="refused") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert secret not in caplog.text and "do-not-log" not in caplog.text

    # The same target, allowed.
    await publish(database, [endpoint])
    allowing = await relaying(secret, allow_private=True)
    await allowing.pass_until(lambda: _true_when(receiver.delivered_ids))


async def test_localhost_resolves_to_no_public_address() -> None:
    resolver = PublicOnlyResolver()
    try:
        with pytest.raises(TargetRefused):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_which_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(address) is public


async def test_undelivered_for_a_day_is_failed_once(
    aiohttp_server: Any, database: Database, relaying: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = new_secret()
    receiver = await start_receiver(aiohttp_server, secret, plan=lambda _id, _attempt: 500)
    await publish(database, [receiver.url])
    await database.execute("UPDATE auth.webhook_outbox SET created_at = now() - interval '25 hours'")
    relaying_ = await relaying(secret)
    with caplog.at_level(logging.ERROR, logger="shared.outbox"):
        await relaying_.relay.run_once()
        await relaying_.relay.run_once()  # nothing left to claim
    (row,) = await rows(database)
    assert row["failed_at"] is not None
    assert row["body"] is None  # failed for good: its body goes too
    assert row["last_error"] == "gave up: HTTP 500"
    assert relaying_.metric(METRIC, outcome="gave_up") == 1
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert receiver.attempts.total() == 1


async def test_oldest_pending_age_is_measured(aiohttp_server: Any, database: Database, relaying: Any) -> None:
    secret = new_secret()
    receiver = await start_receiver(
        aiohttp_server, secret, plan=lambda _id, attempt: 500 if attempt == 1 else 200
    )
    await publish(database, [receiver.url])
    await database.execute("UPDATE auth.webhook_outbox SET created_at = now() - interval '90 seconds'")
    relaying_ = await relaying(secret)
    await relaying_.relay.run_once()
    assert 90 <= relaying_.metric(OLDEST) < 120
    await relaying_.pass_until(lambda: all_delivered(database))
    await relaying_.relay.run_once()
    assert relaying_.metric(OLDEST) == 0


# --- the signature is the standard one ---------------------------------------------------------------


def _message(
    body: str = '{"type":"user.deleted","timestamp":"2026-01-01T00:00:00Z","data":{}}',
) -> WebhookMessage:
    return WebhookMessage(
        uuid.uuid4(), uuid.uuid4(), "user.deleted", "http://example.test/", body, datetime.now(UTC)
    )


def test_signature_is_hmac_sha256_of_id_timestamp_and_body() -> None:
    secret = new_secret()
    message = _message()
    now = datetime.now(UTC)
    headers = WebhookSender(secret, allow_private=True, user_agent="t").headers(message, now)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message.event_id}.{int(now.timestamp())}.{message.body}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert headers["webhook-id"] == str(message.event_id)
    assert Webhook(secret).verify(message.body, headers) == json.loads(message.body)


def test_a_forged_or_replayed_webhook_is_refused_by_the_receiver() -> None:
    secret = new_secret()
    message = _message()
    sender = WebhookSender(secret, allow_private=True, user_agent="t")
    headers = sender.headers(message, datetime.now(UTC))
    with pytest.raises(WebhookVerificationError):  # another body under the signature
        Webhook(secret).verify(message.body.replace("user.deleted", "user.created"), headers)
    with pytest.raises(WebhookVerificationError):  # signed with another secret
        Webhook(new_secret()).verify(message.body, headers)
    old = sender.headers(message, datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError, match="too old"):  # an old attempt, replayed
        Webhook(secret).verify(message.body, old)


async def test_the_receiver_refuses_a_forged_request(aiohttp_server: Any, aiohttp_client: Any) -> None:
    secret = new_secret()
    receiver: Receiver = await start_receiver(aiohttp_server, secret)
    message = _message()
    headers = WebhookSender(new_secret(), allow_private=True, user_agent="t").headers(
        message, datetime.now(UTC)
    )
    sender = WebhookSender(secret, allow_private=True, user_agent="t")
    async with sender:
        assert sender._session is not None
        async with sender._session.post(receiver.url, data=message.body, headers=headers) as response:
            assert response.status == 400
    assert receiver.refused == ["No matching signature found"]


# --- configuration -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_allow_private: bool = False
    webhook_timeout: float = 10.0
    webhook_max_backoff: float = 3600.0
    webhook_poll_interval: float = 1.0


def test_settings_refuse_a_literal_private_address_unless_allowed() -> None:
    secret = new_secret()
    for url in ("http://127.0.0.1:9000/hook", "http://10.0.0.5/hook", "http://[::1]/hook"):
        with pytest.raises(SettingsError, match="ALLOW_PRIVATE"):
            check_webhook_settings("AUTH_", Settings((url,), secret))
        check_webhook_settings("AUTH_", Settings((url,), secret, webhook_allow_private=True))
    # A name is judged at each connection, by what it resolves to.
    check_webhook_settings("AUTH_", Settings(("https://hooks.example.com/in",), secret))


@pytest.mark.parametrize(
    "settings",
    [
        Settings(("ftp://example.com/",), new_secret()),
        Settings(("not a url",), new_secret()),
        Settings(("https://example.com/",), None),
        Settings(("https://example.com/",), new_secret(), webhook_timeout=0),
        Settings(("https://example.com/",), new_secret(), webhook_max_backoff=0.1),
    ],
)
def test_settings_refuse_bad_webhook_configuration(settings: Settings) -> None:
    with pytest.raises(SettingsError):
        check_webhook_settings("REFERRAL_", settings)


@pytest.mark.parametrize(
    "secret", ["", "secret", "whsec_", "whsec_not*base64!", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_a_secret_must_be_a_whsec_one(secret: str) -> None:
    with pytest.raises(SettingsError) as raised:
        check_secret("AUTH_", secret)
    assert (secret not in str(raised.value)) or not secret


def test_a_valid_secret_is_accepted() -> None:
    check_secret("AUTH_", new_secret())
