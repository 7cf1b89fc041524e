"""Cleanup contexts for the resources both services hold: the PostgreSQL pool and the Redis client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.appkeys import DATABASE, HTTP_CLIENT, READINESS_CHECKS, REDIS, ReadinessCheck
from shared.db import create_database

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def postgres_ctx(dsn: str, *, minsize: int, maxsize: int, timeout: float) -> CleanupContext:
    """Open the pool at startup, close it at shutdown; register it with `/readyz`."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = await create_database(dsn, minsize=minsize, maxsize=maxsize, timeout=timeout)
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
