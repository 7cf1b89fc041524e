"""The referral service's events out (API.md "Events out: webhooks"): each emitted by the real endpoint
flow, in the transaction of its change, and received, verified, by a real receiver on loopback."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from services.referral.adapters.repositories import PostgresUnitOfWork
from shared.db import create_database
from tests.referral.conftest import System
from tests.webhook_receiver import Receiver, events, wait_for_events

MY_CODE = "/api/v1/referral/codes/me"


@pytest.fixture
async def hooked(make_system: Any, receiver: Receiver, db: Any) -> System:
    """Both services, the referral one sending its events to the receiver, its outbox emptied first."""
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE referral.webhook_outbox")
    system: System = await make_system(
        webhook_urls=(receiver.url,),
        webhook_secret=receiver.secret,
        webhook_allow_private=True,
        webhook_poll_interval=0.05,
    )
    return system


def outbox_types(db: Any) -> list[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT event_type FROM referral.webhook_outbox ORDER BY created_at, id")
        return [row[0] for row in cursor.fetchall()]


async def test_a_code_created_then_deleted(hooked: System, receiver: Receiver, db: Any) -> None:
    alice = await hooked.user("alice@example.com")
    response = await hooked.create_code(alice, "ALICE-2026")
    assert response.status == 201, await response.text()
    code = await response.json()
    # A second code while one is active is refused: nothing is written for it.
    again = await hooked.create_code(alice, "ALICE-AGAIN")
    assert again.status == 409
    assert (await hooked.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    assert (await hooked.referral.delete(MY_CODE, headers=alice.headers)).status == 404
    delivered = await wait_for_events(receiver, 2)
    created, deleted = delivered["code.created"], delivered["code.deleted"]
    data = {
        "code": "ALICE-2026",
        "owner_id": alice.id,
        "expires_at": created["data"]["expires_at"],
        "max_uses": None,
    }
    assert created == {**created, "type": "code.created", "data": data}
    assert deleted == {**deleted, "type": "code.deleted", "data": data}
    assert created["data"]["expires_at"][:19] == code["expires_at"][:19]
    assert outbox_types(db) == ["code.created", "code.deleted"]
    assert not receiver.refused


async def test_an_activation_then_its_confirmation(hooked: System, receiver: Receiver) -> None:
    alice = await hooked.user("alice@example.com")
    assert (await hooked.create_code(alice, "ALICE-CODE")).status == 201
    bob = await hooked.user("bob@example.com", verified=False)
    response = await hooked.activate(bob, "ALICE-CODE")
    assert response.status == 201, await response.text()
    assert (await hooked.notify_verified(bob.id)).status in (200, 204)
    assert (await hooked.notify_verified(bob.id)).status in (200, 204)  # again: nothing new
    delivered = await wait_for_events(receiver, 3)
    created, confirmed = delivered["referral.created"], delivered["referral.confirmed"]
    assert created["type"] == "referral.created"
    assert created["data"] == {
        "referrer_id": alice.id,
        "referral_id": bob.id,
        "status": "pending",
        "created_at": created["data"]["created_at"],
    }
    assert confirmed["type"] == "referral.confirmed"
    assert confirmed["data"] == {"referrer_id": alice.id, "referral_id": bob.id}
    await asyncio.sleep(0.3)  # a few relay passes: no further event comes
    assert len(events(receiver)) == 3


async def test_the_link_of_a_signup_with_a_code(hooked: System, receiver: Receiver, db: Any) -> None:
    alice = await hooked.user("alice@example.com")
    assert (await hooked.create_code(alice, "ALICE-LINK")).status == 201
    referral_id = str(uuid.uuid4())
    response = await hooked.signup_link(referral_id, alice.id, "carol@example.com", "ALICE-LINK")
    assert response.status in (200, 201), await response.text()
    again = await hooked.signup_link(referral_id, alice.id, "carol@example.com", "ALICE-LINK")
    assert again.status in (200, 201)  # idempotent: no second event
    created = (await wait_for_events(receiver, 2))["referral.created"]
    assert created["type"] == "referral.created"
    assert created["data"]["referral_id"] == referral_id
    assert created["data"]["status"] == "pending"
    assert outbox_types(db) == ["code.created", "referral.created"]


async def test_a_refused_activation_writes_no_event(hooked: System, db: Any) -> None:
    alice = await hooked.user("alice@example.com")
    assert (await hooked.create_code(alice, "ALICE-SELF")).status == 201
    assert (await hooked.activate(alice, "ALICE-SELF")).status == 422  # self-referral
    assert (await hooked.activate(alice, "NO-SUCH-CODE")).status == 404
    assert outbox_types(db) == ["code.created"]


async def test_without_endpoints_no_event_is_written(system: System, db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE referral.webhook_outbox")
    alice = await system.user("alice@example.com")
    assert (await system.create_code(alice)).status == 201
    assert outbox_types(db) == []


async def test_metrics_show_the_deliveries(hooked: System, receiver: Receiver) -> None:
    alice = await hooked.user("alice@example.com")
    assert (await hooked.create_code(alice)).status == 201
    await wait_for_events(receiver, 1)

    async def metrics() -> str:
        return str(await (await hooked.referral.get("/metrics")).text())

    async with asyncio.timeout(10):
        while 'referral_webhook_deliveries_total{outcome="delivered"} 1.0' not in await metrics():
            await asyncio.sleep(0.02)
    assert "referral_webhook_oldest_pending_seconds" in await metrics()


async def test_an_event_is_written_in_the_transaction_of_its_change(database_url: str, db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE referral.webhook_outbox")
    database = await create_database(database_url, minsize=1, maxsize=2, timeout=5.0)
    uow = PostgresUnitOfWork(database, webhook_endpoints=["http://a.test/", "http://b.test/"])

    async def failing_change() -> None:
        async with uow.begin() as tx:
            await tx.events.publish("code.deleted", {"code": "X"})
            raise RuntimeError("the change fails after the event was written")

    try:
        with pytest.raises(RuntimeError):
            await failing_change()
        assert outbox_types(db) == []
        async with uow.begin() as tx:
            await tx.events.publish("code.deleted", {"code": "X"})
        assert outbox_types(db) == ["code.deleted", "code.deleted"]  # one row per endpoint
    finally:
        await database.close()
