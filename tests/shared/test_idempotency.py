"""shared/idempotency.py's store on the real database: claim, replay, refuse, release, lease, expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from services.referral.adapters.tables import idempotency_keys_table
from shared.db import Database, create_database
from shared.idempotency import (
    Answer,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    IdempotencyStore,
    fingerprint,
    idempotency_ctx,
)
from shared.resources import postgres_ctx

PRINT = fingerprint("POST", "/api/v1/referral/codes", b'{"code":"ABCD1234"}')
OTHER = fingerprint("POST", "/api/v1/referral/codes", b'{"code":"WXYZ9876"}')
ANSWER = Answer(201, {"Content-Type": "application/json"}, b'{"code":"ABCD1234"}')


@pytest.fixture
async def database(database_url: str, db: Any) -> AsyncIterator[Database]:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE referral.idempotency_keys")
    database = await create_database(database_url, minsize=1, maxsize=4, timeout=5)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def store(database: Database) -> IdempotencyStore:
    return IdempotencyStore(database, idempotency_keys_table)


def rows(db: Any) -> list[tuple[Any, ...]]:
    with db.cursor() as cursor:
        cursor.execute("SELECT scope, key, state, status FROM referral.idempotency_keys ORDER BY scope, key")
        return cursor.fetchall()


def age(db: Any, *, created: str | None = None, locked: str | None = None) -> None:
    """Move every row's clocks back by an SQL interval."""
    with db.cursor() as cursor:
        if created:
            cursor.execute(
                "UPDATE referral.idempotency_keys SET created_at = created_at - %s::interval", (created,)
            )
        if locked:
            cursor.execute(
                "UPDATE referral.idempotency_keys SET locked_at = locked_at - %s::interval", (locked,)
            )


def test_the_fingerprint_tells_method_path_and_body_apart() -> None:
    prints = {
        fingerprint("POST", "/a", b"b"),
        fingerprint("PUT", "/a", b"b"),
        fingerprint("POST", "/ab", b""),
        fingerprint("POST", "/a", b""),
        fingerprint("POST", "/", b"ab"),
    }
    assert len(prints) == 5
    assert fingerprint("post", "/a", b"b") == fingerprint("POST", "/a", b"b")


async def test_a_finished_answer_is_replayed_exactly(store, db):
    claim = await store.claim("user-1", "k1", PRINT)
    assert isinstance(claim, uuid.UUID)
    assert rows(db) == [("user-1", "k1", "running", None)]
    await store.finish("user-1", "k1", claim, ANSWER)
    assert rows(db) == [("user-1", "k1", "finished", 201)]
    assert await store.claim("user-1", "k1", PRINT) == ANSWER


async def test_a_running_claim_is_in_use_and_another_request_is_refused(store):
    claim = await store.claim("user-1", "k1", PRINT)
    assert isinstance(claim, uuid.UUID)
    with pytest.raises(IdempotencyKeyInUse) as in_use:
        await store.claim("user-1", "k1", PRINT)
    assert in_use.value.headers == {"Retry-After": "1"}
    with pytest.raises(IdempotencyKeyReused):
        await store.claim("user-1", "k1", OTHER)
    await store.finish("user-1", "k1", claim, ANSWER)
    with pytest.raises(IdempotencyKeyReused):
        await store.claim("user-1", "k1", OTHER)


async def test_scopes_keep_the_same_key_apart(store):
    assert isinstance(await store.claim("user-1", "k1", PRINT), uuid.UUID)
    assert isinstance(await store.claim("user-2", "k1", OTHER), uuid.UUID)


async def test_a_released_claim_runs_again(store, db):
    claim = await store.claim("user-1", "k1", PRINT)
    assert isinstance(claim, uuid.UUID)
    await store.release("user-1", "k1", claim)
    assert rows(db) == []
    assert isinstance(await store.claim("user-1", "k1", PRINT), uuid.UUID)


async def test_concurrent_claims_give_the_key_to_exactly_one(store):
    outcomes = await asyncio.gather(
        *(store.claim("user-1", "k1", PRINT) for _ in range(20)), return_exceptions=True
    )
    assert sum(isinstance(o, uuid.UUID) for o in outcomes) == 1
    assert all(isinstance(o, (uuid.UUID, IdempotencyKeyInUse)) for o in outcomes), outcomes


async def test_an_abandoned_claim_is_taken_over_after_the_lease_and_the_old_holder_cannot_finish(store, db):
    crashed = await store.claim("user-1", "k1", PRINT)
    assert isinstance(crashed, uuid.UUID)
    age(db, locked="30 seconds")
    with pytest.raises(IdempotencyKeyInUse):  # within the lease (60 s): still someone's
        await store.claim("user-1", "k1", PRINT)
    age(db, locked="31 seconds")
    with pytest.raises(IdempotencyKeyReused):  # another request never takes over someone's key
        await store.claim("user-1", "k1", OTHER)
    taker = await store.claim("user-1", "k1", PRINT)
    assert isinstance(taker, uuid.UUID) and taker != crashed
    with pytest.raises(IdempotencyKeyInUse):  # the takeover renewed the lease
        await store.claim("user-1", "k1", PRINT)
    # The old holder comes back late: its finish and release touch nothing.
    await store.finish("user-1", "k1", crashed, Answer(201, {}, b"stale"))
    await store.release("user-1", "k1", crashed)
    assert rows(db) == [("user-1", "k1", "running", None)]
    await store.finish("user-1", "k1", taker, ANSWER)
    assert await store.claim("user-1", "k1", PRINT) == ANSWER


async def test_the_lease_is_configurable(database, db):
    store = IdempotencyStore(database, idempotency_keys_table, lease=5)
    assert isinstance(await store.claim("user-1", "k1", PRINT), uuid.UUID)
    age(db, locked="6 seconds")
    assert isinstance(await store.claim("user-1", "k1", PRINT), uuid.UUID)


async def test_a_finished_key_is_never_taken_over_within_its_day(store, db):
    claim = await store.claim("user-1", "k1", PRINT)
    assert isinstance(claim, uuid.UUID)
    await store.finish("user-1", "k1", claim, ANSWER)
    age(db, created="23 hours", locked="23 hours")
    assert await store.claim("user-1", "k1", PRINT) == ANSWER


async def test_an_expired_key_is_a_new_key_even_before_the_cleanup(store, db):
    claim = await store.claim("user-1", "k1", PRINT)
    assert isinstance(claim, uuid.UUID)
    await store.finish("user-1", "k1", claim, ANSWER)
    age(db, created="25 hours")
    assert isinstance(await store.claim("user-1", "k1", OTHER), uuid.UUID)


async def test_the_cleanup_deletes_expired_keys_a_batch_at_a_time(store, db):
    for index in range(5):
        claim = await store.claim("user-1", f"old-{index}", PRINT)
        assert isinstance(claim, uuid.UUID)
        await store.finish("user-1", f"old-{index}", claim, ANSWER)
    age(db, created="25 hours")
    assert isinstance(await store.claim("user-1", "young", PRINT), uuid.UUID)
    assert await store.delete_expired(limit=3) == 3
    assert await store.delete_expired(limit=3) == 2
    assert await store.delete_expired(limit=3) == 0
    assert rows(db) == [("user-1", "young", "running", None)]


async def test_the_service_deletes_expired_keys_by_itself(aiohttp_client, database_url, store, db):
    for key in ("old", "young"):
        claim = await store.claim("user-1", key, PRINT)
        assert isinstance(claim, uuid.UUID)
        await store.finish("user-1", key, claim, ANSWER)
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old'"
        )
    app = web.Application()
    app.cleanup_ctx.append(postgres_ctx(database_url, minsize=1, maxsize=2, timeout=5, server_prepare=True))
    app.cleanup_ctx.append(idempotency_ctx(idempotency_keys_table, cleanup_every=0.05))
    await aiohttp_client(app)
    deadline = asyncio.get_running_loop().time() + 10
    while [key for _, key, _, _ in rows(db)] != ["young"]:
        assert asyncio.get_running_loop().time() < deadline, rows(db)
        await asyncio.sleep(0.05)
