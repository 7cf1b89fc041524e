"""The auth service's events out (API.md "Events out: webhooks"): each emitted by the real endpoint flow,
in the transaction of its change, and received, verified, by a real receiver on loopback."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest

from services.auth.adapters.db.unit_of_work import PostgresUnitOfWork
from shared.db import create_database
from tests.auth.oauth.conftest import mock_provider, session  # noqa: F401 (fixtures)
from tests.auth.oauth.helpers import oidc_settings, sign_in_at_provider
from tests.helpers import Mailbox, assert_problem, signup, verify_email
from tests.webhook_receiver import Receiver, events, wait_for_events

SIGNUP = "/api/v1/auth/signup"
AUTHORIZE = "/api/v1/auth/oauth/mock/authorize"
CALLBACK = "/api/v1/auth/oauth/mock/callback"


@pytest.fixture
def with_webhooks(receiver: Receiver, db: Any) -> dict[str, Any]:
    """The settings that send the auth service's events to the receiver, its outbox emptied first."""
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE auth.webhook_outbox")
    return {
        "webhook_urls": (receiver.url,),
        "webhook_secret": receiver.secret,
        "webhook_allow_private": True,
        "webhook_poll_interval": 0.05,
    }


@pytest.fixture
async def client(make_auth_client: Any, with_webhooks: dict[str, Any]) -> Any:
    return await make_auth_client(**with_webhooks)


def outbox_types(db: Any) -> list[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT event_type FROM auth.webhook_outbox ORDER BY created_at, id")
        return [row[0] for row in cursor.fetchall()]


async def test_a_password_signup_then_its_verification(
    client: Any, receiver: Receiver, mailbox: Mailbox
) -> None:
    body = await signup(client, "wendy@example.com")
    user_id = body["user"]["id"]
    created = (await wait_for_events(receiver, 1))["user.created"]
    assert created["data"] == {
        "user_id": user_id,
        "email_verified": False,
        "referrer_id": None,
        "created_at": created["data"]["created_at"],
    }
    assert created["data"]["created_at"].startswith(body["user"]["created_at"][:19])

    await verify_email(client, mailbox, "wendy@example.com")
    verified = (await wait_for_events(receiver, 2))["user.email_verified"]
    assert verified["data"] == {"user_id": user_id}
    assert not receiver.refused


async def test_a_password_reset_that_proves_the_address(
    client: Any, receiver: Receiver, mailbox: Mailbox
) -> None:
    body = await signup(client, "xena@example.com")
    response = await client.post("/api/v1/auth/password/forgot", json={"email": "xena@example.com"})
    assert response.status == 202, await response.text()
    token = await mailbox.token("xena@example.com", "reset-password")
    response = await client.post(
        "/api/v1/auth/password/reset", json={"token": token, "password": "new horse 2"}
    )
    assert response.status == 200, await response.text()
    verified = (await wait_for_events(receiver, 2))["user.email_verified"]
    assert verified["data"] == {"user_id": body["user"]["id"]}


async def test_a_proven_address_is_announced_once(
    client: Any, receiver: Receiver, mailbox: Mailbox, db: Any
) -> None:
    await signup(client, "yuri@example.com")
    await verify_email(client, mailbox, "yuri@example.com")
    await wait_for_events(receiver, 2)
    # A reset of an address proven already proves nothing new.
    await client.post("/api/v1/auth/password/forgot", json={"email": "yuri@example.com"})
    token = await mailbox.token("yuri@example.com", "reset-password")
    response = await client.post(
        "/api/v1/auth/password/reset", json={"token": token, "password": "new horse 2"}
    )
    assert response.status == 200
    assert outbox_types(db) == ["user.created", "user.email_verified"]


async def test_an_erased_account_is_announced_in_the_erasing_transaction(
    make_auth_client: Any, with_webhooks: dict[str, Any], receiver: Receiver, erasures: Any, db: Any
) -> None:
    client = await make_auth_client(referral_service_url=erasures.url, **with_webhooks)
    body = await signup(client, "yves@example.com")
    user_id = body["user"]["id"]
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    wrong = await client.delete("/api/v1/auth/me", json={"password": "not it"}, headers=headers)
    await assert_problem(wrong, 403, "wrong_password")
    assert outbox_types(db) == ["user.created"]  # a refused erasure announces nothing

    response = await client.delete("/api/v1/auth/me", json={"password": "correct horse"}, headers=headers)
    assert response.status == 204, await response.text()
    deleted = (await wait_for_events(receiver, 2))["user.deleted"]
    assert deleted["data"] == {"user_id": user_id}
    assert outbox_types(db) == ["user.created", "user.deleted"]


async def test_a_failed_change_writes_no_event(client: Any, receiver: Receiver, db: Any) -> None:
    await signup(client, "zoe@example.com")
    taken = await client.post(SIGNUP, json={"email": "ZOE@example.com", "password": "correct horse"})
    await assert_problem(taken, 409, "email_taken")
    invalid = await client.post("/api/v1/auth/email/verify", json={"token": "x" * 43})
    assert invalid.status == 400
    assert outbox_types(db) == ["user.created"]


async def test_without_endpoints_no_event_is_written(auth_client: Any, db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE auth.webhook_outbox")
    await signup(auth_client, "nobody@example.com")
    assert outbox_types(db) == []


async def test_metrics_show_the_deliveries(client: Any, receiver: Receiver) -> None:
    await signup(client, "metric@example.com")
    await wait_for_events(receiver, 1)

    async def delivered() -> float:
        text = await (await client.get("/metrics")).text()
        for line in text.splitlines():
            if line.startswith('auth_webhook_deliveries_total{outcome="delivered"}'):
                return float(line.split()[-1])
        return 0.0

    async with asyncio.timeout(10):  # the relay marks the row right after the answer
        while await delivered() != 1:
            await asyncio.sleep(0.02)
    assert await delivered() == 1
    assert "auth_webhook_oldest_pending_seconds" in await (await client.get("/metrics")).text()


async def sign_in_with_provider(client: Any, http: Any, sub: str, claims: dict[str, Any]) -> Any:
    response = await client.get(AUTHORIZE, allow_redirects=False)
    assert response.status == 302, await response.text()
    code, state = await sign_in_at_provider(http, response.headers["Location"], sub, claims)
    return await client.get(CALLBACK, params={"code": code, "state": state})


async def test_a_provider_signup_and_a_provider_taking_over_an_unproven_account(
    make_auth_client: Any,
    with_webhooks: dict[str, Any],
    receiver: Receiver,
    mock_provider: Any,  # noqa: F811 (the imported fixture)
    session: Any,  # noqa: F811
) -> None:
    client = await make_auth_client(oauth=(oidc_settings(mock_provider.issuer),), **with_webhooks)
    sub = f"u-{uuid.uuid4().hex[:8]}"
    first = await sign_in_with_provider(
        client, session, sub, {"email": f"{sub}@example.com", "email_verified": True}
    )
    assert first.status == 201, await first.text()
    created = (await wait_for_events(receiver, 1))["user.created"]
    assert created["data"]["email_verified"] is True  # proven from the start: no user.email_verified

    squatted = await signup(client, "owner@example.com")
    other = f"u-{uuid.uuid4().hex[:8]}"
    taken = await sign_in_with_provider(
        client, session, other, {"email": "owner@example.com", "email_verified": True}
    )
    assert taken.status == 200, await taken.text()
    await receiver.wait_for(lambda: len(events(receiver)) >= 3)
    delivered = events(receiver)
    assert sorted(e["type"] for e in delivered) == ["user.created", "user.created", "user.email_verified"]
    verified = next(e for e in delivered if e["type"] == "user.email_verified")
    assert verified["data"] == {"user_id": squatted["user"]["id"]}


async def test_an_event_is_written_in_the_transaction_of_its_change(database_url: str, db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE auth.webhook_outbox")
    database = await create_database(database_url, minsize=1, maxsize=2, timeout=5.0)
    uow = PostgresUnitOfWork(
        database, referral_lease=timedelta(seconds=10), webhook_endpoints=["http://a.test/"]
    )
    try:

        async def failing_change() -> None:
            async with uow.transaction() as tx:
                await tx.events.publish("user.deleted", {"user_id": uuid.uuid4()})
                raise RuntimeError("the change fails after the event was written")

        with pytest.raises(RuntimeError):
            await failing_change()
        assert outbox_types(db) == []
        async with uow.transaction() as tx:
            await tx.events.publish("user.deleted", {"user_id": uuid.uuid4()})
        assert outbox_types(db) == ["user.deleted"]
    finally:
        await database.close()
