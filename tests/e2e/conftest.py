"""The end-to-end harness: the whole system as real processes on loopback ports, reached over HTTP.

One stack for the e2e package, started before its first test and stopped after its last (all on
127.0.0.1):

- ``auth-0``, ``auth-1``: ``python -m services.auth serve`` in production mode, both with the same
  freshly generated signing key, cheap argon2 and small database pools;
- ``referral-0``, ``referral-1``: ``python -m services.referral serve``; ``referral-N`` reads the JWKS
  of ``auth-N`` directly (so a token signed by one auth instance and checked by the referral instance
  reading the *other* one's keys proves the key set is shared, not just the process);
- ``gateway``: nginx rendered by ``deploy.nginx.render`` with generous rate limits, ``/api/v1/auth`` to
  both auth instances and ``/api/v1/referral`` to both referral instances;
- ``gateway-tight``: a second nginx over the same upstreams with tiny rate limits, used only by the
  rate-limit tests, so they can flood it in any order without throttling the other tests.

Both auth instances call the internal API of ``referral-0`` (``AUTH_REFERRAL_SERVICE_URL``); the
failover test stops and restarts ``referral-1``, so signups with a code keep working while it is down
and what is tested is the gateway's failover alone. Tokens carry ``iss`` = the main gateway's URL +
``/api/v1/auth`` (``AUTH_PUBLIC_BASE_URL``), which both referral instances expect.

Ports: the auth instances and ``referral-1`` bind port 0 and report theirs; the gateways' ports and
``referral-0``'s are named in the services' environments before those start, so they are picked and
then bound, and the whole start begins again with fresh picks if one was taken meanwhile
(``deploy.local.processes.start_fresh``).

The database is a fresh one for the run, migrated with the services' own CLI (``python -m
services.<name> migrate``) and dropped afterwards; Redis keys live under a prefix of the run's own and
are deleted afterwards. Every process writes its output to ``.artifacts/e2e/<name>.log``. At the end
every process gets SIGTERM, and the harness asserts each exited with 0, left no child behind, and
none had died on its own before. The processes are ``deploy.local.processes.Process``, the supervisor
``make run`` and the benchmark use too. nginx must be installed: a missing one fails the run (it is
never skipped).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2
import pytest

from deploy.local.processes import (
    AUTH_API,
    Process,
    base_url,
    free_port,
    http_status,
    launch,
    nginx_gateway,
    start_fresh,
    stop_all,
)
from services.auth.adapters.signing import generate_pem
from tests import harness
from tests.e2e.api import Account, client, new_account
from tests.helpers import drop_redis_keys, fresh_database

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts" / "e2e"
START_TIMEOUT = 30.0
GENEROUS = {"rate": "1000r/s", "burst": 1000}
TIGHT = {"rate": "1r/s", "burst": 2}


@dataclass
class Stack:
    """The running system; tests reach it over HTTP, and may stop/start one referral instance."""

    gateway_url: str
    tight_gateway_url: str
    auth: list[Process]
    referral: list[Process]
    gateways: list[Process]
    signing_pem: str
    database_url: str

    @property
    def issuer(self) -> str:
        return self.gateway_url + AUTH_API

    @property
    def auth_urls(self) -> list[str]:
        return [process.url for process in self.auth]

    @property
    def referral_urls(self) -> list[str]:
        return [process.url for process in self.referral]

    def stop_referral(self, index: int) -> None:
        """Stop one referral instance (SIGTERM, wait) and check its port no longer answers."""
        process = self.referral[index]
        code = process.stop()
        assert code == 0, process.log_tail()
        assert http_status(process.health_url) is None, f"{process.name} still answers after it stopped"

    def start_referral(self, index: int) -> None:
        """Start a stopped referral instance again on the same port and wait until it is healthy."""
        process = self.referral[index]
        process.start()
        process.wait_healthy(time.monotonic() + START_TIMEOUT)


@pytest.fixture(scope="package")
def e2e_database_url(server_database_url: str) -> Iterator[str]:
    """A fresh, empty database for the e2e run (the services' CLI migrates it), dropped afterwards."""
    try:
        psycopg2.connect(server_database_url, connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        pytest.exit(f"PostgreSQL is not reachable at DATABASE_URL: {error}", returncode=3)
    with fresh_database(server_database_url, f"e2e_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="package")
def e2e_redis_prefix(redis_url: str) -> Iterator[str]:
    """The run's own Redis key prefix; its keys are deleted afterwards."""
    prefix = f"e2e:{secrets.token_hex(6)}:"
    yield prefix
    drop_redis_keys(redis_url, prefix)


@pytest.fixture(scope="package")
def stack(
    e2e_database_url: str, redis_url: str, e2e_redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Migrate, start every process, wait for every /healthz; at the end stop all and check they exited."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.log"):
        old.unlink()
    pem = generate_pem()
    harness.migrate(e2e_database_url, redis_url, ARTIFACTS, timeout=60)
    runtime = tmp_path_factory.mktemp("nginx")

    def attempt(started: list[Process]) -> Stack:
        gateway_port, tight_port, referral_port = free_port(), free_port(), free_port()
        gateway_url = base_url(gateway_port)
        auth_env, referral_env = harness.production_envs(
            harness.servers_env(e2e_database_url, redis_url),
            redis_prefix=e2e_redis_prefix,
            signing_pem=pem,
            gateway_url=gateway_url,
        )
        auth_env |= harness.LIGHT_AUTH | {"AUTH_REFERRAL_SERVICE_URL": base_url(referral_port)}
        referral_env |= harness.LIGHT_REFERRAL
        deadline = time.monotonic() + START_TIMEOUT
        auth: list[Process] = []
        referral: list[Process] = []
        for i in range(2):
            pair = harness.service_pair(
                i,
                auth_env,
                referral_env,
                jwks_url="",  # set below, once auth-i has reported its port
                log_dir=ARTIFACTS,
                referral_port=referral_port if i == 0 else 0,
            )
            auth.append(pair[0])
            referral.append(pair[1])
        launch(started, auth, deadline)
        for auth_process, referral_process in zip(auth, referral, strict=True):
            referral_process.env["REFERRAL_AUTH_JWKS_URL"] = harness.jwks_of(auth_process)
        launch(started, referral, deadline)
        auth_ports = [process.port for process in auth]
        referral_ports = [process.port for process in referral]
        gateways = [
            nginx_gateway(
                name, port, auth_ports, referral_ports, runtime / name, log_dir=ARTIFACTS, limits=limits
            )
            for name, port, limits in (
                ("gateway", gateway_port, GENEROUS),
                ("gateway-tight", tight_port, TIGHT),
            )
        ]
        launch(started, gateways, deadline)
        for process in [*auth, *referral]:
            assert http_status(process.url + "/readyz") == 200, (
                f"{process.name} is not ready:\n{process.log_tail()}"
            )
        return Stack(
            gateway_url=gateway_url,
            tight_gateway_url=base_url(tight_port),
            auth=auth,
            referral=referral,
            gateways=gateways,
            signing_pem=pem,
            database_url=e2e_database_url,
        )

    system, started = start_fresh(attempt)
    yield system
    problems = stop_all(started)
    if problems:
        pytest.fail("the stack did not shut down cleanly:\n" + "\n".join(problems))


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the main gateway: paths are relative to its URL."""
    async with client(stack.gateway_url) as session:
        yield session


@pytest.fixture
async def tight_gateway(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the gateway with tiny rate limits."""
    async with client(stack.tight_gateway_url) as session:
        yield session


@pytest.fixture
def make_account(gateway: aiohttp.ClientSession) -> Any:
    """`await make_account("alice", referral_code=None)`: a new user signed up through the gateway."""

    async def make(tag: str = "user", *, referral_code: str | None = None) -> Account:
        return await new_account(gateway, tag, referral_code=referral_code)

    return make
