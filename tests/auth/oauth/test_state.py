"""OAuthStateStore on the real Redis: round trip, single use, expiry, unknown states, Redis down."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator

import pytest
from aiocache import RedisCache
from redis.asyncio import Redis

from services.auth.adapters.oauth.state import OAuthStateStore, StateStoreUnavailable, StoredFlow
from shared.resources import close_redis_cache, redis_cache
from tests.auth.oauth.helpers import free_port


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisCache]:
    cache = redis_cache(redis_url, timeout=1)
    try:
        yield cache
    finally:
        await close_redis_cache(cache)


@pytest.fixture
def store(cache: RedisCache, redis_prefix: str) -> OAuthStateStore:
    return OAuthStateStore(cache, prefix=redis_prefix, ttl=600)


async def test_round_trip(store, redis, redis_prefix):
    flow = await store.create("google", referral_code="ABCD-1234")
    assert len(flow.state) >= 43  # 256 bits
    challenge = base64.urlsafe_b64encode(hashlib.sha256(flow.code_verifier.encode()).digest()).rstrip(b"=")
    assert flow.code_challenge == challenge.decode()
    assert 0 < await redis.ttl(f"{redis_prefix}oauth:state:{flow.state}") <= 600
    assert await store.consume(flow.state) == StoredFlow(
        provider="google", code_verifier=flow.code_verifier, nonce=flow.nonce, referral_code="ABCD-1234"
    )


async def test_without_a_referral_code(store):
    flow = await store.create("github", referral_code=None)
    stored = await store.consume(flow.state)
    assert stored is not None
    assert (stored.provider, stored.referral_code) == ("github", None)


async def test_a_state_is_good_once(store):
    flow = await store.create("google", referral_code=None)
    results = await asyncio.gather(*(store.consume(flow.state) for _ in range(5)))
    assert sum(result is not None for result in results) == 1


async def test_flows_do_not_share_anything(store):
    first, second = (
        await store.create("google", referral_code=None),
        await store.create("google", referral_code=None),
    )
    assert first.state != second.state
    assert first.code_verifier != second.code_verifier
    assert first.nonce != second.nonce


async def test_a_state_expires(cache, redis, redis_prefix):
    store = OAuthStateStore(cache, prefix=redis_prefix, ttl=1)
    flow = await store.create("google", referral_code=None)
    key = f"{redis_prefix}oauth:state:{flow.state}"
    assert await redis.exists(key)
    async with asyncio.timeout(5):
        while await redis.exists(key):  # Redis expires it after its TTL
            await asyncio.sleep(0.05)
    assert await store.consume(flow.state) is None


@pytest.mark.parametrize("state", ["", "x" * 43, "not a state at all", "A" * 500])
async def test_unknown_or_malformed_states_are_none(store, state):
    assert await store.consume(state) is None


async def test_redis_down_is_a_clear_error():
    cache = redis_cache(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    store = OAuthStateStore(cache, prefix="down:")
    try:
        with pytest.raises(StateStoreUnavailable):
            await store.create("google", referral_code=None)
        with pytest.raises(StateStoreUnavailable):
            await store.consume("A" * 43)
    finally:
        await close_redis_cache(cache)
