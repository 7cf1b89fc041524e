"""A restart loses no request: SIGTERM under traffic thirty times in a row, and a rolling restart of every
instance of both services, with clients going through the real gateway all along.

The stack is this module's own (`restarts`): auth-0, auth-1, referral-0 and referral-1 in production
mode on a database and a Redis prefix of their own; nginx rendered from the production template, with
its service-to-service listener (the auth instances reach the referral instances through it, with the
gateway's failover, as a Kubernetes Service would spread their calls); the referral instances read
the JWKS through the gateway; Hunter's verifier is a `FakeVendor` on loopback whose answers can be held,
to keep signups in flight while an instance is told to stop.

The timings are the production ones scaled down so that thirty stops fit in the suite: nginx closes an
idle upstream connection after 1 s and leaves a refusing instance out for 1 s, the services drain for
2 s (production: 3 s, 3 s, 5 s). What must hold is the order, idle timeout below the drain; that the
defaults keep it is checked in tests/deploy/test_nginx.py.

An instance is "in the rotation" once it has answered an API request the gateway sent it since it
started (its /metrics); every stop waits for every instance of the service to be in it, as a rolling
update waits for readiness. Process logs are in `.artifacts/e2e/restarts/<pid of the test run>/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from deploy.local.processes import (
    HOST,
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
from shared.migrations import apply_migrations
from tests.conftest import AUTH_MIGRATIONS, REFERRAL_MIGRATIONS
from tests.e2e.api import CODES, ME, REFERRALS, SIGNUP, TOKEN, Account, referrals_of, unique_email
from tests.e2e.conftest import ARTIFACTS, GENEROUS, START_TIMEOUT
from tests.e2e.faults import FakeVendor, LoopThread, bounded_client, eventually, wait_until
from tests.e2e.traffic import (
    Outcome,
    assert_writes_whole,
    call,
    linked,
    new_code,
    new_user,
    signup_body,
)
from tests.harness import LIGHT_AUTH, LIGHT_REFERRAL, production_envs, servers_env, service_pair
from tests.helpers import KeptAliveConnection, drop_redis_keys, fresh_database, fresh_run_dir, query

RESTART_ARTIFACTS = ARTIFACTS / "restarts" / str(os.getpid())
STOPS = 30
IN_FLIGHT = 3  # signups held on the instance being stopped, sent to it directly
WORKERS = 3  # clients going through the gateway all along
DRAIN = 2.0  # AUTH_/REFERRAL_SHUTDOWN_DRAIN of this stack
GATEWAY_IDLE = 1  # the gateway's upstream keepalive_timeout, below DRAIN
GATEWAY_FAIL = 1  # the gateway's fail_timeout
CLIENT_TIMEOUT = 15.0
# Every answer a client of the gateway may get while instances restart: the successes, nothing else.
ALLOWED = {
    "signup": {201},
    "activate": {201},
    "me": {200},
    "refresh": {200},
    "lookup": {200},
    "referrals": {200},
}


@dataclass
class RestartStack:
    gateway_url: str
    auth: list[Process]
    referral: list[Process]
    gateway: Process
    database_url: str
    vendor: FakeVendor

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return query(self.database_url, sql, params)


@pytest.fixture(scope="module")
def restarts(
    server_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RestartStack]:
    """The stack: started before the module's first test, stopped (each exit checked) after its last."""
    fresh_run_dir(RESTART_ARTIFACTS.parent)
    prefix = f"e2e-restarts:{secrets.token_hex(6)}:"
    runner = LoopThread()
    vendor = FakeVendor(runner, token_endpoint="http://127.0.0.1:9/unused")
    started: list[Process] = []
    try:
        with fresh_database(server_database_url, f"restarts_{os.getpid()}") as database_url:
            apply_migrations(database_url, "auth", AUTH_MIGRATIONS)
            apply_migrations(database_url, "referral", REFERRAL_MIGRATIONS)
            vendor.start()

            def attempt(into: list[Process]) -> RestartStack:
                gateway_port, internal_port = free_port(), free_port()
                gateway_url = base_url(gateway_port)
                auth_env, referral_env = production_envs(
                    servers_env(database_url, redis_url),
                    redis_prefix=prefix,
                    signing_pem=generate_pem(),
                    gateway_url=gateway_url,
                )
                auth_env |= LIGHT_AUTH | {
                    "AUTH_REFERRAL_SERVICE_URL": base_url(internal_port),
                    "AUTH_OUTBOX_POLL_INTERVAL": "0.2",
                    "AUTH_OUTBOX_MAX_BACKOFF": "1.0",
                    "AUTH_HUNTER_API_KEY": "fake-hunter-key",
                    "AUTH_HUNTER_BASE_URL": vendor.url,
                    "AUTH_HUNTER_MAX_POLLS": "1",
                    "AUTH_SHUTDOWN_DRAIN": str(DRAIN),
                }
                referral_env |= LIGHT_REFERRAL | {"REFERRAL_SHUTDOWN_DRAIN": str(DRAIN)}
                # Through the gateway, as a Kubernetes Service: whichever auth instance is up.
                jwks_url = f"{gateway_url}/api/v1/auth/.well-known/jwks.json"
                pairs = [
                    service_pair(i, auth_env, referral_env, jwks_url=jwks_url, log_dir=RESTART_ARTIFACTS)
                    for i in range(2)
                ]
                auth = [pair[0] for pair in pairs]
                referral = [pair[1] for pair in pairs]
                deadline = time.monotonic() + START_TIMEOUT
                launch(into, [*auth, *referral], deadline)
                gateway = nginx_gateway(
                    "gateway",
                    gateway_port,
                    [p.port for p in auth],
                    [p.port for p in referral],
                    tmp_path_factory.mktemp("restarts-nginx"),
                    log_dir=RESTART_ARTIFACTS,
                    limits=GENEROUS,
                    internal_listen=f"{HOST}:{internal_port}",
                    upstream_keepalive_timeout=GATEWAY_IDLE,
                    upstream_fail_timeout=GATEWAY_FAIL,
                )
                launch(into, [gateway], deadline)
                return RestartStack(gateway_url, auth, referral, gateway, database_url, vendor)

            stack, processes = start_fresh(attempt)
            started.extend(processes)
            yield stack
            problems = stop_all(list(started))
            started.clear()
            if problems:
                pytest.fail("the restart stack did not shut down cleanly:\n" + "\n".join(problems))
    finally:
        stop_all(list(started))  # only when the start or a test failed: the failure to report is that one
        with contextlib.suppress(Exception):
            vendor.close()
        runner.close()
        drop_redis_keys(redis_url, prefix)


# --- helpers ---------------------------------------------------------------------------------------


def served(process: Process) -> int:
    """API requests the process has answered since it started, from its /metrics."""
    with urllib.request.urlopen(f"{process.url}/metrics", timeout=2) as response:
        text = response.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("http_requests_total{") and 'route="/api/' in line
        )
    )


async def refusing(url: str) -> bool:
    """Nothing accepts a connection at `url` any more."""
    return await asyncio.to_thread(http_status, url) is None


async def in_rotation(processes: Sequence[Process]) -> None:
    """Until each process has answered an API request since now: the gateway sends it traffic again."""
    before = {p.name: await asyncio.to_thread(served, p) for p in processes}

    async def all_served() -> bool:
        counts = {p.name: await asyncio.to_thread(served, p) for p in processes}
        return all(counts[name] > before[name] for name in counts)

    await eventually(all_served, seconds=20, poll=0.05, what="every instance back in the gateway's rotation")


@dataclass
class Traffic:
    """Clients of the gateway doing every kind of request, over and over, until `stop`."""

    owner: Account
    code: str
    outcomes: list[Outcome] = field(default_factory=list)
    referred: list[str] = field(default_factory=list)  # ids of users signed up with the code
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, session: aiohttp.ClientSession, account: Account) -> None:
        record = self.outcomes
        refresh = account.refresh_token
        while not self.stop.is_set():
            signed = await call(
                session, "signup", "POST", SIGNUP, record, json=signup_body(unique_email("roll"), self.code)
            )
            if signed.status == 201:
                self.referred.append(signed.json()["user"]["id"])
            plain = await call(
                session, "signup", "POST", SIGNUP, record, json=signup_body(unique_email("roll"))
            )
            if plain.status == 201:
                token = plain.json()["access_token"]
                await call(
                    session,
                    "activate",
                    "POST",
                    REFERRALS,
                    record,
                    json={"code": self.code},
                    headers={"Authorization": f"Bearer {token}"},
                )
            await call(session, "me", "GET", ME, record, headers=account.headers)
            form = {"grant_type": "refresh_token", "refresh_token": refresh}
            refreshed = await call(session, "refresh", "POST", TOKEN, record, data=form)
            if refreshed.status == 200:
                refresh = refreshed.json()["refresh_token"]
            await call(session, "lookup", "GET", CODES, record, params={"email": self.owner.email})
            await call(
                session,
                "referrals",
                "GET",
                referrals_of(self.owner.id),
                record,
                params={"limit": "5"},
                headers=account.headers,
            )

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in ALLOWED[o.op]]


@contextlib.asynccontextmanager
async def traffic(stack: RestartStack, gateway: aiohttp.ClientSession):
    owner = await new_user(gateway, "roll-owner")
    code = await new_code(gateway, owner)
    running = Traffic(owner, code)
    accounts = [await new_user(gateway, f"roll-client-{i}") for i in range(WORKERS)]
    tasks = [asyncio.create_task(running.worker(gateway, account)) for account in accounts]
    try:
        yield running
    finally:
        running.stop.set()
        await asyncio.gather(*tasks)


async def assert_nothing_lost(
    stack: RestartStack, running: Traffic, also_referred: Sequence[str] = ()
) -> None:
    """No failed request through the gateway; every accepted signup's link delivered, once."""
    failures = running.failures()
    assert not failures, f"{len(failures)} of {len(running.outcomes)} requests failed:\n" + "\n".join(
        str(o) for o in failures[:20]
    )
    accepted = [*running.referred, *also_referred]

    def all_arrived() -> dict[str, tuple[str, int]] | None:
        links = linked(stack, accepted)
        return links if len(links) == len(accepted) else None

    links = await asyncio.to_thread(wait_until, all_arrived, seconds=20, what="every accepted signup's link")
    assert all(referrer == running.owner.id and count == 1 for referrer, count in links.values()), links
    assert_writes_whole(stack)


def assert_clean_logs(processes: Sequence[Process]) -> None:
    """No request was cancelled and nothing crashed in any instance, across all its restarts."""
    for process in processes:
        log = process.log_path.read_text(errors="replace")
        assert "cancelled" not in log.lower(), f"{process.name}:\n{process.log_tail(40)}"
        assert "Traceback" not in log, f"{process.name}:\n{process.log_tail(40)}"


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_sigterm_under_traffic_loses_nothing_thirty_times_in_a_row(restarts: RestartStack) -> None:
    """Each time: signups in flight on the instance (held at the email verifier), clients going through
    the gateway all along. It turns not ready on the connection it has and refuses new ones at once,
    answers what it had, exits 0; started again, it rejoins the rotation. No client sees a failure."""
    exits: list[float] = []
    held: list[str] = []
    async with (
        bounded_client(restarts.gateway_url, seconds=CLIENT_TIMEOUT) as gateway,
        bounded_client(seconds=CLIENT_TIMEOUT) as direct,
        traffic(restarts, gateway) as running,
    ):
        for stop in range(STOPS):
            victim = restarts.auth[stop % 2]
            assert victim.popen is not None
            await in_rotation(restarts.auth)
            kept = await KeptAliveConnection.open(HOST, victim.port)
            try:
                ready = await kept.request("GET", "/readyz")
                assert ready.status == 200 and not ready.closes, ready
                restarts.vendor.hold()
                try:
                    emails = {unique_email(f"held-{stop}-{i}") for i in range(IN_FLIGHT)}
                    in_flight = [
                        asyncio.create_task(
                            call(
                                direct,
                                "signup",
                                "POST",
                                victim.url + SIGNUP,
                                json=signup_body(email, running.code),
                            )
                        )
                        for email in emails
                    ]
                    await eventually(
                        functools.partial(emails.issubset, restarts.vendor.waiting_emails),
                        seconds=5,
                        poll=0.01,
                        what="signups in flight on the instance",
                    )
                    victim.terminate()
                    signalled = time.monotonic()
                    # The signal is handled at once: new connections are refused, then the one it has
                    # answers not ready, and closes.
                    await eventually(
                        functools.partial(refusing, victim.health_url),
                        seconds=2,
                        poll=0.02,
                        what="new connections refused",
                    )
                    stopping = await kept.request("GET", "/readyz")
                    assert stopping.status == 503 and stopping.closes, stopping
                    assert victim.popen.poll() is None, "exited with requests in flight"
                finally:
                    restarts.vendor.release()
            finally:
                await kept.close()
            finished = await asyncio.gather(*in_flight)
            code = await asyncio.to_thread(victim.wait_stopped)
            exits.append(time.monotonic() - signalled)
            assert code == 0, victim.log_tail()
            for outcome in finished:
                assert outcome.status == 201, str(outcome)
                assert outcome.json()["user"]["referrer_id"] == running.owner.id, str(outcome)
                held.append(outcome.json()["user"]["id"])
            victim.start()
            await asyncio.to_thread(victim.wait_healthy, time.monotonic() + START_TIMEOUT)
        await in_rotation(restarts.auth)
    await assert_nothing_lost(restarts, running, held)
    assert_clean_logs(restarts.auth)
    print(
        f"\n{STOPS} stops under traffic: {len(running.outcomes)} requests through the gateway, none failed;"
        f" {len(held)} held requests answered; exit after SIGTERM in {min(exits):.2f}-{max(exits):.2f} s"
    )


@pytest.mark.timeout(300)
async def test_a_rolling_restart_of_every_instance_loses_no_request(restarts: RestartStack) -> None:
    instances = [*restarts.auth, *restarts.referral]
    async with (
        bounded_client(restarts.gateway_url, seconds=CLIENT_TIMEOUT) as gateway,
        traffic(restarts, gateway) as running,
    ):
        for process in instances:
            await in_rotation(instances)
            code = await asyncio.to_thread(process.stop)
            assert code == 0, process.log_tail()
            process.start()
            await asyncio.to_thread(process.wait_healthy, time.monotonic() + START_TIMEOUT)
        await in_rotation(instances)
    await assert_nothing_lost(restarts, running)
    assert_clean_logs(instances)
    print(f"\nrolling restart of {len(instances)} instances: {len(running.outcomes)} requests, none failed")
