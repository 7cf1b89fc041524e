"""IdentityRepository on the real PostgreSQL (the migrated test database), alone and in a unit of work."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from services.auth.adapters.db.identities import IdentityRepository
from services.auth.adapters.db.unit_of_work import PostgresUnitOfWork
from services.auth.domain.errors import IdentityAlreadyLinked
from shared.db import Database, ForeignKeyViolation, create_database


@pytest.fixture
async def database(database_url: str, db: Any) -> AsyncIterator[Database]:
    database = await create_database(database_url, minsize=1, maxsize=4, timeout=5)
    try:
        yield database
    finally:
        await database.close()


def unit_of_work(database: Database) -> PostgresUnitOfWork:
    return PostgresUnitOfWork(database, referral_lease=timedelta(seconds=10))


def new_user(db: Any, email: str) -> uuid.UUID:
    with db.cursor() as cursor:
        cursor.execute("INSERT INTO auth.users (email) VALUES (%s) RETURNING id", (email,))
        (user_id,) = cursor.fetchone()
    return uuid.UUID(str(user_id))


async def test_add_then_find(database, db):
    repository = IdentityRepository(database)
    user_id = new_user(db, "jane@example.com")
    assert await repository.user_for("google", "sub-1") is None
    async with unit_of_work(database).transaction() as tx:
        await tx.identities.add("google", "sub-1", user_id, "jane@example.com")
        assert await tx.identities.user_for("google", "sub-1") == user_id
    assert await repository.user_for("google", "sub-1") == user_id
    assert await repository.user_for("github", "sub-1") is None, "subjects are per provider"


async def test_a_subject_links_one_user_only(database, db):
    repository = IdentityRepository(database)
    first, second = new_user(db, "a@example.com"), new_user(db, "b@example.com")
    async with unit_of_work(database).transaction() as tx:
        await tx.identities.add("google", "sub-2", first, "a@example.com")
    with pytest.raises(IdentityAlreadyLinked):
        async with unit_of_work(database).transaction() as tx:
            await tx.identities.add("google", "sub-2", second, "b@example.com")
    assert await repository.user_for("google", "sub-2") == first


async def test_a_rolled_back_transaction_links_nothing(database, db):
    repository = IdentityRepository(database)
    user_id = new_user(db, "c@example.com")

    async def link_then_fail() -> None:
        async with unit_of_work(database).transaction() as tx:
            await tx.identities.add("google", "sub-3", user_id, "c@example.com")
            raise RuntimeError("the signup failed later")

    with pytest.raises(RuntimeError):
        await link_then_fail()
    assert await repository.user_for("google", "sub-3") is None


async def test_an_unknown_user_cannot_be_linked(database, db):
    with pytest.raises(ForeignKeyViolation):
        async with unit_of_work(database).transaction() as tx:
            await tx.identities.add("google", "sub-4", uuid.uuid4(), "d@example.com")


async def test_deleting_the_user_deletes_the_identity(database, db):
    repository = IdentityRepository(database)
    user_id = new_user(db, "e@example.com")
    await repository.add("github", "42", user_id, "e@example.com")
    with db.cursor() as cursor:
        cursor.execute("DELETE FROM auth.users WHERE id = %s", (str(user_id),))
    assert await repository.user_for("github", "42") is None
