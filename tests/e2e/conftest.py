"""The end-to-end harness: the whole system as real processes on loopback ports, reached over HTTP.

One stack for the e2e package, started before its first test and stopped after its last (all on
127.0.0.1, each on a free port picked at start):

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

The database is a fresh one for the run, migrated with the services' own CLI (``python -m
services.<name> migrate``) and dropped afterwards; Redis keys live under a prefix of the run's own and
are deleted afterwards. Every process writes its output to ``.artifacts/e2e/<name>.log``. At the end
every process gets SIGTERM, and the harness asserts each exited with 0, left no child behind, and
none had died on its own before.

The processes are ``tests.processes.Process`` (start, health, SIGTERM and the checks), shared with the
benchmark.

``E2E_GATEWAY=python`` runs the Python dev gateway (``deploy.local.gateway``) instead of nginx; it has
no rate limits, so the rate-limit tests fail under it (they test the nginx gateway). With the default
(``nginx``), a missing nginx fails the run: it is never skipped.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2
import pytest

from services.auth.adapters.signing import generate_pem
from tests import processes
from tests.e2e.api import Account, client, new_account
from tests.helpers import drop_redis_keys, fresh_database
from tests.processes import (
    AUTH_API,
    base_url,
    free_port,
    http_status,
)
from tests.processes import origin as _origin
from tests.processes import stop_all as _stop_all

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts" / "e2e"
START_TIMEOUT = 30.0
GENEROUS = {"rate": "1000r/s", "burst": 1000}
TIGHT = {"rate": "1r/s", "burst": 2}


@dataclass
class Process(processes.Process):
    """A process of the e2e stack: its output in `.artifacts/e2e/<name>.log`."""

    log_dir: Path = ARTIFACTS


@dataclass
class Stack:
    """The running system; tests reach it over HTTP, and may stop/start one referral instance."""

    gateway_url: str
    tight_gateway_url: str
    gateway_kind: str
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
        return [_origin(process.health_url) for process in self.auth]

    @property
    def referral_urls(self) -> list[str]:
        return [_origin(process.health_url) for process in self.referral]

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


def _nginx_gateway(
    name: str, port: int, auth: list[int], referral: list[int], limits: Mapping[str, Any], runtime: Path
) -> Process:
    built = processes.nginx_gateway(name, port, auth, referral, limits, runtime, log_dir=ARTIFACTS)
    return Process(built.name, built.command, built.env, built.health_url)


def _python_gateway(name: str, port: int, auth: list[int], referral: list[int]) -> Process:
    built = processes.python_gateway(name, port, auth, referral, log_dir=ARTIFACTS)
    return Process(built.name, built.command, built.env, built.health_url)


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
    kind = os.environ.get("E2E_GATEWAY", "nginx")
    if kind not in ("nginx", "python"):
        pytest.fail(f"E2E_GATEWAY must be nginx or python, got {kind!r}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.log"):
        old.unlink()
    pem = generate_pem()
    gateway_port, tight_port = free_port(), free_port()
    auth_ports = [free_port(), free_port()]
    referral_ports = [free_port(), free_port()]
    gateway_url = base_url(gateway_port)
    common = processes.servers_env(e2e_database_url, redis_url)
    auth_env, referral_env = processes.production_envs(
        common, redis_prefix=e2e_redis_prefix, signing_pem=pem, gateway_url=gateway_url
    )
    auth_env |= processes.LIGHT_AUTH | {"AUTH_REFERRAL_SERVICE_URL": base_url(referral_ports[0])}
    referral_env |= processes.LIGHT_REFERRAL
    processes.migrate(e2e_database_url, redis_url, ARTIFACTS, timeout=60)

    pairs = [
        processes.service_pair(i, auth_port, referral_port, auth_env, referral_env, Process)
        for i, (auth_port, referral_port) in enumerate(zip(auth_ports, referral_ports, strict=True))
    ]
    auth = [pair[0] for pair in pairs]
    referral = [pair[1] for pair in pairs]
    if kind == "nginx":
        runtime = tmp_path_factory.mktemp("nginx")
        gateways = [
            _nginx_gateway("gateway", gateway_port, auth_ports, referral_ports, GENEROUS, runtime / "main"),
            _nginx_gateway("gateway-tight", tight_port, auth_ports, referral_ports, TIGHT, runtime / "tight"),
        ]
    else:
        gateways = [
            _python_gateway("gateway", gateway_port, auth_ports, referral_ports),
            _python_gateway("gateway-tight", tight_port, auth_ports, referral_ports),
        ]
    started: list[Process] = []
    system = Stack(
        gateway_url=gateway_url,
        tight_gateway_url=base_url(tight_port),
        gateway_kind=kind,
        auth=auth,
        referral=referral,
        gateways=gateways,
        signing_pem=pem,
        database_url=e2e_database_url,
    )
    try:
        for process in [*auth, *referral, *gateways]:
            process.start()
            started.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        for process in started:
            process.wait_healthy(deadline)
        for process in [*auth, *referral]:
            ready = _origin(process.health_url) + "/readyz"
            assert http_status(ready) == 200, f"{process.name} is not ready:\n{process.log_tail()}"
    except BaseException:
        _stop_all(started)  # the start-up failure is the one to report
        raise
    yield system
    problems = _stop_all(started)
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
