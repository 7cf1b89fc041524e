"""The deny-list of erased subjects (shared/denylist.py): every process refuses at once, and when Redis
cannot be read the service's table still refuses the erased subject (fails closed)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from services.auth.adapters.db.erasure import DENY_LIST
from shared.db import create_database
from shared.denylist import DenyList


async def _mirrored(*lists: DenyList) -> None:
    async with asyncio.timeout(10):
        while not all(d.mirrored for d in lists):
            await asyncio.sleep(0.01)


async def test_an_entry_is_refused_by_every_process_when_deny_returns(database_url, redis_url, redis_prefix):
    database = await create_database(database_url, minsize=1, maxsize=2, timeout=2.0)
    clients = [Redis.from_url(redis_url, socket_timeout=2.0) for _ in range(3)]
    lists = [DenyList(c, database, DENY_LIST, prefix=f"{redis_prefix}deny:") for c in clients]
    try:
        for d in lists:
            d.start()
        await _mirrored(*lists)
        subject, other = uuid.uuid4(), uuid.uuid4()
        assert await lists[0].deny(subject, datetime.now(UTC) + timedelta(minutes=1))
        # No waiting: the eraser's answer came after every mirror acknowledged.
        assert [await d.is_denied(str(subject)) for d in lists] == [True, True, True]
        assert [await d.is_denied(str(other)) for d in lists] == [False, False, False]
        # A process that starts later loads the set.
        clients.append(Redis.from_url(redis_url))  # closed with the others
        late = DenyList(clients[-1], database, DENY_LIST, prefix=f"{redis_prefix}deny:")
        assert await late.is_denied(str(subject))  # not mirrored yet: asks Redis
        late.start()
        await _mirrored(late)
        assert await late.is_denied(str(subject))
        await late.stop()
    finally:
        for d in lists:
            await d.stop()
        for c in clients:
            await c.aclose()
        await database.close()


async def test_with_redis_down_the_table_still_refuses_the_erased_subject(database_url, redis_prefix):
    database = await create_database(database_url, minsize=1, maxsize=2, timeout=2.0)
    gone = Redis(unix_socket_path=f"/nonexistent/{uuid.uuid4().hex}.sock", socket_timeout=0.5)
    denied = DenyList(gone, database, DENY_LIST, prefix=f"{redis_prefix}deny:")
    subject, other = uuid.uuid4(), uuid.uuid4()
    try:
        async with database.transaction() as conn:
            await DENY_LIST.record_in(conn, subject, datetime.now(UTC) + timedelta(minutes=1))
        assert not denied.mirrored  # as with a mirror whose subscription is down
        assert await denied.is_denied(str(subject))
        assert not await denied.is_denied(str(other))
        assert not await denied.deny(other, datetime.now(UTC) + timedelta(minutes=1))  # Redis not written
    finally:
        await denied.stop()
        await gone.connection_pool.disconnect()
        await gone.aclose()
        await database.close()
