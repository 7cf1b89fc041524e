"""Cleanup contexts for the resources the services hold: the PostgreSQL pool, the Redis client, the
aiocache cache, the outgoing HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiocache import RedisCache
from aiocache.serializers import JsonSerializer
from aiohttp import web
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.appkeys import CACHE, DATABASE, HTTP_CLIENT, READINESS_CHECKS, REDIS, ReadinessCheck
from shared.db import create_database

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def postgres_ctx(
    dsn: str, *, minsize: int, maxsize: int, timeout: float, server_prepare: bool
) -> CleanupContext:
    """Open the pool at startup, close it at shutdown; register it with `/readyz`."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = await create_database(
            dsn, minsize=minsize, maxsize=maxsize, timeout=timeout, server_prepare=server_prepare
        )
        app[DATABASE] = database
        app.setdefault(READINESS_CHECKS, []).append(ReadinessCheck("postgres", database.ping))
        try:
            yield
        finally:
            await database.close()

    return ctx


def redis_ctx(url: str, *, timeout: float) -> CleanupContext:
    """A Redis client whose commands fail fast (socket timeouts) rather than hang."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            # One immediate retry (a pooled connection Redis closed after a restart), no backoff:
            # when Redis is down, callers fall back at once instead of waiting through retries.
            retry=Retry(NoBackoff(), 1),
            retry_on_timeout=False,
        )
        app[REDIS] = client
        app.setdefault(READINESS_CHECKS, []).append(ReadinessCheck("redis", client.ping))
        try:
            yield
        finally:
            await client.aclose()

    return ctx


def redis_cache(url: str, *, timeout: float) -> RedisCache:
    """An aiocache Redis cache (JSON values) for the plain get/set-with-TTL stores, on a small pool of
    its own with the same URL and socket timeouts as the service's client. Its per-call `wait_for` is
    off (timeout None): the socket timeouts bound a call, as they do for every other Redis command."""

    def pool(**_parts: Any) -> ConnectionPool:
        # aiocache hands its pool class the host and port it would connect to; the URL says more
        # (a unix socket, TLS, a user name), so the pool is made from the URL itself.
        return ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )

    return RedisCache(connection_pool_class=pool, serializer=JsonSerializer(), timeout=None)


async def close_redis_cache(cache: RedisCache) -> None:
    """aiocache's close() calls redis-py's deprecated close(); aclose() is the same, current one."""
    await cache.client.aclose()


def aiocache_ctx(url: str, *, timeout: float) -> CleanupContext:
    """The aiocache cache of `redis_cache`, closed at shutdown."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        cache = redis_cache(url, timeout=timeout)
        app[CACHE] = cache
        try:
            yield
        finally:
            await close_redis_cache(cache)

    return ctx


def http_client_ctx(*, timeout: float, user_agent: str) -> CleanupContext:
    """One outgoing HTTP session for the process: pooled keep-alive connections, a total timeout."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30, ttl_dns_cache=60),
            headers={"User-Agent": user_agent},
        )
        app[HTTP_CLIENT] = session
        try:
            yield
        finally:
            await session.close()

    return ctx
