"""Typed application keys for the resources the shared pieces manage (services add their own)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiocache import RedisCache
from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from shared.db import Database
from shared.tokens import TokenVerifier


@dataclass(frozen=True)
class ReadinessCheck:
    """A named dependency `/readyz` probes; `probe` raises when it is not usable."""

    name: str
    probe: Callable[[], Awaitable[object]]


@dataclass
class Lifecycle:
    """Whether the process is stopping: set once, at the signal (shared/serving.py); `/readyz` and
    every answer read it."""

    stopping: bool = False


DATABASE = web.AppKey("database", Database)
REDIS = web.AppKey("redis", Redis)
CACHE = web.AppKey("cache", RedisCache)  # aiocache, for the plain get/set-with-TTL stores
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
READINESS_CHECKS = web.AppKey("readiness_checks", list[ReadinessCheck])
TOKEN_VERIFIER = web.AppKey("token_verifier", TokenVerifier)
HTTP_CLIENT = web.AppKey("http_client", ClientSession)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
