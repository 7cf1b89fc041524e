"""Test fixtures: a real PostgreSQL database and Redis, the real apps through aiohttp_client.

With DATABASE_URL / REDIS_URL set, the tests use those servers (a fresh database per run, dropped
at the end; Redis keys under a unique prefix, deleted at the end). Without them, embedded servers
are started under `.data/test/`. A server that is configured but unreachable fails the run loudly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from aiohttp.test_utils import TestClient

from deploy.local import requirements
from services.auth.adapters.signing import generate_pem
from services.auth.app import create_app as create_auth_app
from services.auth.settings import PREFIX as AUTH_PREFIX
from services.auth.settings import AuthSettings
from shared.config import load_settings
from shared.migrations import apply_migrations
from tests import harness
from tests.helpers import Mailbox, drop_redis_keys, fresh_database
from tests.webhook_receiver import Receiver, new_secret, start_receiver

ROOT = Path(__file__).resolve().parent.parent
AUTH_MIGRATIONS = ROOT / "services" / "auth" / "migrations"
REFERRAL_MIGRATIONS = ROOT / "services" / "referral" / "migrations"
DATA_DIR = ROOT / ".data" / "test"
# The programs beyond Python that tests need (deploy/local/requirements.py), by test file or folder.
NEEDS = {
    "tests/e2e/": ("nginx",),
    "tests/e2e/test_docs_browser.py": ("chromium",),
    "tests/e2e/test_mail_pages_browser.py": ("chromium",),
    "tests/deploy/test_nginx.py": ("nginx",),
    "tests/deploy/test_launcher.py": ("nginx",),
    "tests/perf/test_topology.py": ("nginx",),
    "tests/perf/test_wrk.py": ("wrk",),
}


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Stop the session at once, with one line saying what to run, when a program the collected tests
    need is missing (`make test` installs them first): never hundreds of errors, never a skip."""
    needed: dict[str, None] = {}
    for item in items:
        try:
            path = Path(str(item.path)).resolve().relative_to(ROOT).as_posix()
        except ValueError:  # a test outside the repository
            continue
        for prefix, programs in NEEDS.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                needed.update(dict.fromkeys(programs))
    absent = requirements.missing(list(needed))
    if absent:
        pytest.exit(requirements.advice(absent), returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def server_database_url() -> Iterator[str]:
    """A PostgreSQL server: DATABASE_URL's, or an embedded one."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from deploy.local.embedded import start_postgres

    server = start_postgres(DATA_DIR / "postgres")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_redis_url() -> Iterator[str]:
    """A Redis server: REDIS_URL's, or an embedded one."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from deploy.local.embedded import start_redis

    server = start_redis(DATA_DIR / "redis")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(server_database_url: str) -> Iterator[str]:
    """A fresh database for this run, migrated, dropped afterwards."""
    try:
        psycopg2.connect(server_database_url, connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        pytest.exit(f"PostgreSQL is not reachable at DATABASE_URL: {error}", returncode=3)
    with fresh_database(server_database_url, f"test_{os.getpid()}") as url:
        apply_migrations(url, "auth", AUTH_MIGRATIONS)
        apply_migrations(url, "referral", REFERRAL_MIGRATIONS)
        yield url


@pytest.fixture(scope="session")
def redis_url(server_redis_url: str) -> str:
    client = redis.Redis.from_url(server_redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.exit(f"Redis is not reachable at REDIS_URL: {error}", returncode=3)
    finally:
        client.close()
    return server_redis_url


@pytest.fixture(scope="session")
def signing_pem() -> str:
    return generate_pem()


@pytest.fixture
def db(database_url: str) -> Iterator[Any]:
    """A plain psycopg2 connection to the test database, for arranging and inspecting rows."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(
            "TRUNCATE auth.users, auth.refresh_tokens, referral.codes, referral.referrals,"
            " referral.referrer_totals, referral.verified_users, referral.referrer_levels,"
            " referral.leaderboard_counts CASCADE"
        )
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    drop_redis_keys(redis_url, prefix)


@pytest.fixture(scope="session")
def smtp() -> Any:
    """The SMTP server the tests' auth services send their mails to (a real one, on loopback)."""
    return harness.harness_smtp()


@pytest.fixture
def mailbox(smtp: Any) -> Mailbox:
    """The mails that arrive from now on."""
    return Mailbox(smtp.mail_dir)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    """A webhook receiver on loopback with a secret of its own, verifying what it is sent."""
    return await start_receiver(aiohttp_server, new_secret())


@pytest.fixture
def auth_settings(
    database_url: str, redis_url: str, redis_prefix: str, signing_pem: str, smtp: Any
) -> AuthSettings:
    """Production-mode settings; argon2 kept cheap so the suite stays fast (still argon2id)."""
    environ = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        f"{AUTH_PREFIX}ENV": "production",
        f"{AUTH_PREFIX}REDIS_PREFIX": redis_prefix,
        f"{AUTH_PREFIX}DENY_LIST_PREFIX": f"{redis_prefix}deny:",
        f"{AUTH_PREFIX}JWT_PRIVATE_KEYS": signing_pem,
        f"{AUTH_PREFIX}ARGON2_TIME_COST": "1",
        f"{AUTH_PREFIX}ARGON2_MEMORY_KIB": "8192",
        f"{AUTH_PREFIX}ARGON2_PARALLELISM": "1",
        f"{AUTH_PREFIX}DB_POOL_MIN": "1",
        f"{AUTH_PREFIX}DB_POOL_MAX": "24",
        f"{AUTH_PREFIX}SMTP_URL": smtp.url,
        f"{AUTH_PREFIX}OUTBOX_POLL_INTERVAL": "0.2",
    }
    return load_settings(AuthSettings, AUTH_PREFIX, environ)


@pytest.fixture
async def auth_client(aiohttp_client: Any, auth_settings: AuthSettings, db: Any) -> TestClient[Any, Any]:
    """The real auth app on a loopback port, over a truncated database."""
    return await aiohttp_client(create_auth_app(auth_settings))


@pytest.fixture
def make_auth_client(aiohttp_client: Any, auth_settings: AuthSettings, db: Any) -> Any:
    """Build an auth client with some settings changed: `await make_auth_client(login_lockout_seconds=2)`."""

    async def make(**changes: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_auth_app(replace(auth_settings, **changes)))

    return make
