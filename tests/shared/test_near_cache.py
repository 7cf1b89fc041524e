"""The near cache against a real Redis: it serves only while Redis tracks its keys for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from redis.asyncio import Redis

from shared.near_cache import NearCache
from tests.helpers import kill_tracking_connections


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def near(client: Redis, redis_prefix: str) -> AsyncIterator[NearCache]:
    cache = NearCache(client, f"{redis_prefix}email:", size=100, ttl=30)
    cache.start()
    await until(lambda: cache.enabled)
    yield cache
    await cache.stop()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds; fail after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_a_kept_value_is_served_until_another_client_changes_the_key(near, client, redis_prefix):
    key = f"{redis_prefix}email:jane@example.com"
    near.put(key, "code-1", near.generation)
    assert near.get(key) == "code-1"
    await client.set(key, "changed")  # any other connection's write: Redis pushes the invalidation
    await until(lambda: near.get(key) is None)


async def test_keys_outside_the_prefix_do_not_evict(near, client, redis_prefix):
    key = f"{redis_prefix}email:jane@example.com"
    near.put(key, "code-1", near.generation)
    await client.set(f"{redis_prefix}code:abcd", "x")
    await client.set(f"{redis_prefix}email:someone-else@example.com", "x")
    await until(lambda: near.generation > 0)  # the second write was pushed, and handled
    assert near.get(key) == "code-1"


async def test_a_read_that_raced_a_change_is_not_kept(near, client, redis_prefix):
    key = f"{redis_prefix}email:jane@example.com"
    before = near.generation  # a reader starts its Redis GET here...
    await client.set(key, "new")  # ...and somebody changes the key meanwhile
    await until(lambda: near.generation != before)
    near.put(key, "old", before)
    assert near.get(key) is None


async def test_own_changes_evict_at_once(near, redis_prefix):
    key = f"{redis_prefix}email:jane@example.com"
    near.put(key, "code-1", near.generation)
    near.evict([key])
    assert near.get(key) is None


async def test_a_lost_tracking_connection_drops_everything_until_tracking_again(
    near, client, redis_prefix, redis_url
):
    key = f"{redis_prefix}email:jane@example.com"
    near.put(key, "code-1", near.generation)
    with redis.Redis.from_url(redis_url) as admin:
        assert kill_tracking_connections(admin, f"{redis_prefix}email:") == 1
    await until(lambda: not near.enabled)
    assert near.get(key) is None
    near.put(key, "code-1", near.generation)  # not kept while nothing tracks
    assert near.get(key) is None
    await until(lambda: near.enabled)  # reconnected and tracking again
    near.put(key, "code-2", near.generation)
    assert near.get(key) == "code-2"


async def test_entries_are_bounded_and_expire(client, redis_prefix):
    cache = NearCache(client, f"{redis_prefix}email:", size=2, ttl=0.2)
    cache.start()
    try:
        await until(lambda: cache.enabled)
        for name in ("a", "b", "c"):
            cache.put(name, name, cache.generation)
        assert [cache.get(name) for name in ("a", "b", "c")] == [None, "b", "c"]
        await until(lambda: cache.get("c") is None, seconds=2)  # expired after its 0.2 s
    finally:
        await cache.stop()


async def test_size_zero_means_no_near_cache(client, redis_prefix):
    cache = NearCache(client, f"{redis_prefix}email:", size=0, ttl=30)
    cache.start()
    await asyncio.sleep(0.1)
    assert not cache.enabled
    cache.put("a", "a", cache.generation)
    assert cache.get("a") is None
    await cache.stop()


async def test_an_announced_own_write_is_not_taken_for_a_change(near, client, redis_prefix):
    key = f"{redis_prefix}email:jane@example.com"
    before = near.generation
    near.expect_echo(key)
    await client.set(key, "mine")  # this process's write: Redis tells us anyway
    near.put(key, "mine", before)
    await client.set(f"{redis_prefix}email:other@example.com", "x")  # a marker that comes after the echo
    await until(lambda: near.generation != before)
    assert near.get(key) == "mine"
    await client.set(key, "someone else's")  # not announced: a change
    await until(lambda: near.get(key) is None)
