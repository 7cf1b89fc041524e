"""Faults against real processes: PostgreSQL and Redis outages, a stopped referral service and hung third
parties (SIGTERM and restarts under traffic: test_restarts.py).

These tests run on a small stack of their own (`faults`, module-scoped), so that breaking things never
disturbs the shared `stack`: two auth instances, one referral instance and a gateway (nginx, rendered
by `deploy.nginx.render`), on a database of their own, reaching PostgreSQL and Redis through
`tests.e2e.faults.TcpProxy` (an outage is a `cut()` of the proxy: every connection aborted, new ones
refused; the shared servers are never touched). Hunter and the OpenID Connect provider are
`FakeVendor` on loopback, the enrichment vendor is a `Blackhole` that accepts and never answers.
Process logs are in `.artifacts/e2e/faults/<pid of the test run>/`.

Every request is bounded by a client timeout (`bounded_client`), so a hang fails the test instead of
stalling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import psycopg2
import psycopg2.extensions
import pytest
import redis

from deploy.local.processes import (
    AUTH_API,
    HOST,
    Process,
    base_url,
    free_port,
    http_status,
    launch,
    nginx_gateway,
    service,
    start_fresh,
    stop_all,
)
from services.auth.adapters.signing import generate_pem
from shared.migrations import apply_migrations
from tests.conftest import AUTH_MIGRATIONS, REFERRAL_MIGRATIONS
from tests.e2e.api import (
    CODES,
    ME,
    MY_CODE,
    PASSWORD,
    REFERRALS,
    SIGNUP,
    TOKEN,
    Account,
    bearer,
    unique_email,
)
from tests.e2e.conftest import ARTIFACTS, GENEROUS, START_TIMEOUT
from tests.e2e.faults import (
    Blackhole,
    FakeVendor,
    LoopThread,
    TcpProxy,
    bounded_client,
    eventually,
    wait_until,
)
from tests.e2e.traffic import (
    Outcome,
    assert_answers,
    assert_unavailable,
    assert_writes_whole,
    call,
    code_body,
    linked,
    lookup_code,
    new_code,
    new_user,
    signup_body,
    user_ids,
)
from tests.harness import LIGHT_AUTH, LIGHT_REFERRAL, harness_smtp, production_envs, servers_env
from tests.helpers import Mailbox, drop_redis_keys, fresh_run_dir, query, with_database

# Per run: the e2e package may be running in another process at the same time.
FAULT_ARTIFACTS = ARTIFACTS / "faults" / str(os.getpid())
DB_TIMEOUT = 5.0  # AUTH_DB_TIMEOUT / REFERRAL_DB_TIMEOUT (the default); the client waits 1 s more
# Under an outage the proxy refuses or resets at once, so an answer must come far sooner than the
# services' DB timeout + grace (6 s): a request not answered in this is a hang.
CLIENT_TIMEOUT = 2.5
HUNTER_TIMEOUT = 2.0
ENRICHMENT_TIMEOUT = 1.5
OIDC_TIMEOUT = 1.0
MARGIN = 1.0  # what a request that waits for a third party's timeout may take beyond it


@dataclass
class FaultStack:
    gateway_url: str
    auth: list[Process]
    referral: Process
    gateway: Process
    database_url: str  # direct, for the tests' own checks
    redis_url: str  # direct
    redis_prefix: str
    postgres: TcpProxy
    redis: TcpProxy
    vendor: FakeVendor
    blackhole: Blackhole

    @property
    def auth_urls(self) -> list[str]:
        return [p.url for p in self.auth]

    @property
    def referral_url(self) -> str:
        return self.referral.url

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement directly on the stack's database (not through the proxy)."""
        return query(self.database_url, sql, params)

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every other connection to the stack's database; how many."""
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return sum(1 for (done,) in rows if done)

    def redis_keys(self, contains: str = "") -> list[str]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return [
                key.decode()
                for key in client.scan_iter(match=f"{self.redis_prefix}*", count=1000)
                if contains in key.decode()
            ]
        finally:
            client.close()

    def all_ready(self) -> bool:
        return all(http_status(p.url + "/readyz") == 200 for p in [*self.auth, self.referral])


def _proxied(runner: LoopThread, url: str, default_port: int) -> tuple[TcpProxy, str]:
    """A started proxy to the server at `url` (TCP, or a unix socket as the embedded servers use), and
    the URL that reaches the server through it."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    upstream: tuple[str, int] | str
    if parts.scheme == "unix":  # Redis: unix:///path?db=N
        upstream = parts.path
        proxy = TcpProxy(runner, upstream)
        proxy.start()
        return proxy, f"redis://{HOST}:{proxy.port}/{query.get('db', ['0'])[0]}"
    port = parts.port or int(query.pop("port", [str(default_port)])[0])
    socket_dir = query.pop("host", [""])[0]
    if socket_dir.startswith("/"):  # PostgreSQL: ...?host=/socket/dir&port=N
        upstream = f"{socket_dir}/.s.PGSQL.{port}"
    else:
        upstream = (parts.hostname or HOST, port)
    proxy = TcpProxy(runner, upstream)
    proxy.start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{HOST}:{proxy.port}" if userinfo else f"{HOST}:{proxy.port}"
    return proxy, parts._replace(netloc=netloc, query=urlencode(query, doseq=True)).geturl()


@pytest.fixture(scope="module")
def faults(
    server_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultStack]:
    """The fault stack: started before the module's first test, stopped (each exit checked) after its last."""
    fresh_run_dir(FAULT_ARTIFACTS.parent)
    name = f"faults_{os.getpid()}_{secrets.token_hex(4)}"
    admin = psycopg2.connect(server_database_url, connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    database_url = with_database(server_database_url, name)
    runner = LoopThread()
    prefix = f"e2e-faults:{secrets.token_hex(6)}:"
    started: list[Process] = []
    closers: list[Any] = []
    try:
        apply_migrations(database_url, "auth", AUTH_MIGRATIONS)
        apply_migrations(database_url, "referral", REFERRAL_MIGRATIONS)
        postgres, proxied_database_url = _proxied(runner, database_url, 5432)
        closers.append(postgres)
        redis_proxy, proxied_redis_url = _proxied(runner, redis_url, 6379)
        closers.append(redis_proxy)
        blackhole = Blackhole(runner)
        blackhole.start()
        closers.append(blackhole)
        vendor = FakeVendor(runner, token_endpoint=f"{blackhole.url}/token")
        vendor.start()
        closers.append(vendor)

        def attempt(into: list[Process]) -> FaultStack:
            gateway_port, referral_port = free_port(), free_port()
            gateway_url = base_url(gateway_port)
            common = servers_env(proxied_database_url, proxied_redis_url)
            auth_env, referral_env = production_envs(
                common, redis_prefix=prefix, signing_pem=generate_pem(), gateway_url=gateway_url
            )
            auth_env |= LIGHT_AUTH | {
                "AUTH_REFERRAL_SERVICE_URL": base_url(referral_port),
                "AUTH_DB_TIMEOUT": str(DB_TIMEOUT),
                "AUTH_OUTBOX_POLL_INTERVAL": "0.2",
                "AUTH_OUTBOX_MAX_BACKOFF": "1.0",
                "AUTH_HUNTER_API_KEY": "fake-hunter-key",
                "AUTH_HUNTER_BASE_URL": vendor.url,
                "AUTH_HUNTER_TIMEOUT": str(HUNTER_TIMEOUT),
                "AUTH_HUNTER_MAX_POLLS": "1",
                "AUTH_ENRICHMENT_API_KEY": "fake-enrichment-key",
                "AUTH_ENRICHMENT_BASE_URL": blackhole.url,
                "AUTH_ENRICHMENT_TIMEOUT": str(ENRICHMENT_TIMEOUT),
                "AUTH_ENRICHMENT_MAX_ATTEMPTS": "1",
                "AUTH_ENRICHMENT_CONCURRENCY": "64",
                "AUTH_OAUTH_PROVIDERS": "hung,slow",
                "AUTH_OAUTH_HUNG_ISSUER": f"{blackhole.url}/hung",
                "AUTH_OAUTH_HUNG_CLIENT_ID": "client-hung",
                "AUTH_OAUTH_HUNG_CLIENT_SECRET": "secret-hung",
                "AUTH_OAUTH_HUNG_TIMEOUT": str(OIDC_TIMEOUT),
                "AUTH_OAUTH_SLOW_ISSUER": vendor.oidc_issuer,
                "AUTH_OAUTH_SLOW_CLIENT_ID": "client-slow",
                "AUTH_OAUTH_SLOW_CLIENT_SECRET": "secret-slow",
                "AUTH_OAUTH_SLOW_TIMEOUT": str(OIDC_TIMEOUT),
            }
            referral_env |= LIGHT_REFERRAL | {
                # Through the gateway: either auth instance may be down.
                "REFERRAL_AUTH_JWKS_URL": f"{gateway_url}{AUTH_API}/.well-known/jwks.json",
                "REFERRAL_DB_TIMEOUT": str(DB_TIMEOUT),
                # Stopped to be down (not to drain: test_restarts.py covers that), at once: its idle
                # connections from the auth instances are closed without waiting for them.
                "REFERRAL_SHUTDOWN_DRAIN": "0",
            }
            auth = [
                service(f"auth-{i}", "services.auth", auth_env, port_env="AUTH_PORT", log_dir=FAULT_ARTIFACTS)
                for i in range(2)
            ]
            referral = service(
                "referral",
                "services.referral",
                referral_env,
                port_env="REFERRAL_PORT",
                port=referral_port,
                log_dir=FAULT_ARTIFACTS,
            )
            deadline = time.monotonic() + START_TIMEOUT
            launch(into, [*auth, referral], deadline)
            runtime = tmp_path_factory.mktemp("faults-nginx")
            gateway = nginx_gateway(
                "gateway",
                gateway_port,
                [process.port for process in auth],
                [referral_port],
                runtime,
                log_dir=FAULT_ARTIFACTS,
                limits=GENEROUS,
            )
            launch(into, [gateway], deadline)
            system = FaultStack(
                gateway_url=gateway_url,
                auth=auth,
                referral=referral,
                gateway=gateway,
                database_url=database_url,
                redis_url=redis_url,
                redis_prefix=prefix,
                postgres=postgres,
                redis=redis_proxy,
                vendor=vendor,
                blackhole=blackhole,
            )
            assert system.all_ready(), "\n".join(p.log_tail() for p in into)
            return system

        system, processes = start_fresh(attempt)
        started.extend(processes)
        yield system
        problems = stop_all(list(started))
        started.clear()
        if problems:
            pytest.fail("the fault stack did not shut down cleanly:\n" + "\n".join(problems))
    finally:
        stop_all(list(started))  # only when the start or a test failed: the failure to report is that one
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                closer.close()
        runner.close()
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        drop_redis_keys(redis_url, prefix)


# --- helpers ---------------------------------------------------------------------------------------


async def all_ready(faults: FaultStack) -> bool:
    return await asyncio.to_thread(faults.all_ready)


# --- 1. PostgreSQL --------------------------------------------------------------------------------

TRAFFIC_ALLOWED = {
    "signup": {201},
    "password": {200},
    "refresh": {200, 400},  # 400: a rotation that committed but whose answer was lost, then reused
    "me": {200},
    "code_create": {201, 409},  # 409: the previous delete's answer was lost
    "code_delete": {204, 404},
    "lookup": {200},
}


@dataclass
class Traffic:
    outcomes: list[Outcome] = field(default_factory=list)
    accepted: list[tuple[str, bool]] = field(default_factory=list)  # (email, with a code)
    created_codes: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def flowed(self, requests: int = 12, *, what: str) -> None:
        """Until `requests` more requests have been answered (or have failed) from now on."""
        goal = len(self.outcomes) + requests
        await eventually(lambda: len(self.outcomes) >= goal, seconds=15, poll=0.02, what=what)

    async def run(self, session: aiohttp.ClientSession, account: Account, owner: Account, code: str) -> None:
        """Every kind of request, over and over, until `stop`."""
        refresh = account.refresh_token
        record = self.outcomes
        turn = 0
        while not self.stop.is_set():
            turn += 1
            email = unique_email("traffic")
            with_code = turn % 2 == 0
            body = signup_body(email, code if with_code else None)
            if (await call(session, "signup", "POST", SIGNUP, record, json=body)).status == 201:
                self.accepted.append((email, with_code))
            form = {"grant_type": "password", "username": account.email, "password": PASSWORD}
            granted = await call(session, "password", "POST", TOKEN, record, data=form)
            if granted.status == 200:
                refresh = granted.json()["refresh_token"]
            form = {"grant_type": "refresh_token", "refresh_token": refresh}
            refreshed = await call(session, "refresh", "POST", TOKEN, record, data=form)
            if refreshed.status == 200:
                refresh = refreshed.json()["refresh_token"]
            await call(session, "me", "GET", ME, record, headers=account.headers)
            created = await call(
                session, "code_create", "POST", CODES, record, json=code_body(), headers=account.headers
            )
            if created.status == 201:
                self.created_codes.append(created.json()["code"])
            await call(session, "code_delete", "DELETE", MY_CODE, record, headers=account.headers)
            await call(session, "lookup", "GET", CODES, record, params={"email": owner.email})


async def test_postgres_outage_fails_fast_with_503_and_the_pools_heal(faults: FaultStack) -> None:
    async with (
        bounded_client(faults.gateway_url, seconds=CLIENT_TIMEOUT) as gateway,
        bounded_client(seconds=CLIENT_TIMEOUT) as direct,
    ):
        owner = await new_user(gateway, "pg-owner")
        code = await new_code(gateway, owner)
        accounts = [await new_user(gateway, f"pg-{i}") for i in range(6)]
        traffic = Traffic()
        workers = [asyncio.create_task(traffic.run(gateway, account, owner, code)) for account in accounts]
        try:
            await traffic.flowed(what="traffic before the faults")
            # Connections killed under the services' feet, three times, with traffic in between.
            killed = 0
            for _ in range(3):
                killed += await asyncio.to_thread(faults.terminate_backends)
                await traffic.flowed(what="traffic after the connections were killed")
            assert killed >= 3, killed
            # PostgreSQL unreachable: every connection cut, new ones refused.
            faults.postgres.cut()
            try:
                for url in [*faults.auth_urls, faults.referral_url]:
                    ready = await call(direct, "readyz", "GET", url + "/readyz")
                    assert ready.status == 503, str(ready)
                    assert ready.json()["checks"]["postgres"].startswith("unavailable"), str(ready)
                during = await call(
                    direct,
                    "signup",
                    "POST",
                    faults.gateway_url + SIGNUP,
                    json=signup_body(unique_email("pg-cut")),
                )
                assert_unavailable(during)
                await traffic.flowed(what="traffic while PostgreSQL is cut")
            finally:
                faults.postgres.restore()
            # Healed by themselves: nothing restarted.
            await eventually(
                lambda: all_ready(faults), seconds=10, what="ready again after PostgreSQL is back"
            )
            await traffic.flowed(what="traffic after PostgreSQL is back")
        finally:
            traffic.stop.set()
            await asyncio.gather(*workers)

        outcomes = traffic.outcomes
        assert_answers(outcomes, TRAFFIC_ALLOWED)
        unavailable = [o for o in outcomes if o.status == 503]
        assert unavailable, "the outage was never seen"
        slowest = max(o.elapsed for o in outcomes)
        print(
            f"\npostgres: {len(outcomes)} requests, {len(unavailable)} answered 503, slowest {slowest:.2f} s,"
            f" slowest 503 {max(o.elapsed for o in unavailable):.2f} s, {killed} backends terminated"
        )

        # Everything works again, first time, whichever instance answers.
        for i in range(4):
            fresh = await new_user(gateway, f"pg-after{i}", code=code)
            assert fresh.referrer_id == owner.id
            granted = await call(
                gateway,
                "password",
                "POST",
                TOKEN,
                data={"grant_type": "password", "username": fresh.email, "password": PASSWORD},
            )
            assert granted.status == 200, str(granted)
            refreshed = await call(
                gateway,
                "refresh",
                "POST",
                TOKEN,
                data={"grant_type": "refresh_token", "refresh_token": granted.json()["refresh_token"]},
            )
            assert refreshed.status == 200, str(refreshed)
            me = await call(gateway, "me", "GET", ME, headers=fresh.headers)
            assert me.status == 200 and me.json()["id"] == fresh.id, str(me)
            fresh_code = await new_code(gateway, fresh)
            found = await lookup_code(gateway, fresh.email)
            assert found.status == 200 and found.json()["code"] == fresh_code, str(found)
            deleted = await call(gateway, "code_delete", "DELETE", MY_CODE, headers=fresh.headers)
            assert deleted.status == 204, str(deleted)

    # No write half-done, and every accepted write is there.
    assert_writes_whole(faults)
    accepted = [email for email, _ in traffic.accepted]
    found_ids = user_ids(faults, accepted)
    assert len(found_ids) == len(accepted), {e.lower() for e in accepted} - set(found_ids)
    with_code = [str(found_ids[e.lower()]) for e, coded in traffic.accepted if coded]
    referred = faults.query(
        "SELECT id::text, referrer_id::text FROM auth.users WHERE id = ANY(%s::uuid[])", (with_code,)
    )
    assert all(referrer == owner.id for _, referrer in referred), referred
    created = faults.query(
        "SELECT lower(code) FROM referral.codes WHERE lower(code) = ANY(%s)",
        ([c.lower() for c in traffic.created_codes],),
    )
    assert len(created) == len(set(traffic.created_codes)), "a code answered 201 is not in the database"


# --- 2. Redis -------------------------------------------------------------------------------------


async def _fallback_count(session: aiohttp.ClientSession, auth_url: str) -> float:
    metrics = await call(session, "metrics", "GET", auth_url + "/metrics")
    for line in metrics.body.splitlines():
        if line.startswith("auth_login_throttle_fallback_total"):
            return float(line.split()[-1])
    return 0.0


async def test_redis_outage_is_served_from_postgres_and_memory(faults: FaultStack) -> None:
    auth0 = faults.auth_urls[0]
    async with (
        bounded_client(faults.gateway_url, seconds=CLIENT_TIMEOUT) as gateway,
        bounded_client(seconds=CLIENT_TIMEOUT) as direct,
    ):
        owner = await new_user(gateway, "rd-owner")
        code = await new_code(gateway, owner)
        doomed = await new_user(gateway, "rd-doomed")
        doomed_code = await new_code(gateway, doomed)
        for email in (owner.email, doomed.email):
            assert (await lookup_code(gateway, email)).status == 200
        for text in (code, doomed_code):  # the code check of a signup: cached by code text too
            await new_user(gateway, "rd-warm", code=text)
        assert faults.redis_keys(owner.email.lower()), "the cache is not used to begin with"
        joiner = await new_user(gateway, "rd-joiner")
        writer = await new_user(gateway, "rd-writer")
        victim = await new_user(gateway, "rd-victim")
        innocent = await new_user(gateway, "rd-innocent")
        fallbacks_before = await _fallback_count(direct, auth0)
        outcomes: list[Outcome] = []

        faults.redis.cut()
        try:
            for url in [auth0, faults.referral_url]:
                ready = await call(direct, "readyz", "GET", url + "/readyz")
                assert ready.status == 503 and ready.json()["checks"]["redis"].startswith("unavailable"), str(
                    ready
                )
            # Lookups and the signup's code check, from PostgreSQL.
            found = await call(gateway, "lookup", "GET", CODES, outcomes, params={"email": owner.email})
            assert found.status == 200 and found.json()["code"] == code, str(found)
            referred = await call(
                gateway, "signup", "POST", SIGNUP, outcomes, json=signup_body(unique_email("rd-signup"), code)
            )
            assert referred.status == 201 and referred.json()["user"]["referrer_id"] == owner.id, str(
                referred
            )
            # Activation.
            activated = await call(
                gateway, "activate", "POST", REFERRALS, outcomes, json={"code": code}, headers=joiner.headers
            )
            assert activated.status == 201 and activated.json()["referrer_id"] == owner.id, str(activated)
            # Codes created and deleted, and seen so at once.
            created = await call(
                gateway, "code_create", "POST", CODES, outcomes, json=code_body(), headers=writer.headers
            )
            assert created.status == 201, str(created)
            found = await call(gateway, "lookup", "GET", CODES, outcomes, params={"email": writer.email})
            assert found.status == 200 and found.json()["code"] == created.json()["code"], str(found)
            deleted = await call(gateway, "code_delete", "DELETE", MY_CODE, outcomes, headers=writer.headers)
            assert deleted.status == 204, str(deleted)
            found = await call(gateway, "lookup", "GET", CODES, outcomes, params={"email": writer.email})
            assert found.status == 404, str(found)
            # A code deleted while its cache entry cannot be replaced (checked again once Redis is back).
            deleted = await call(gateway, "code_delete", "DELETE", MY_CODE, outcomes, headers=doomed.headers)
            assert deleted.status == 204, str(deleted)
            # Token grants, refresh, the user's own record.
            form = {"grant_type": "password", "username": innocent.email, "password": PASSWORD}
            granted = await call(gateway, "password", "POST", TOKEN, outcomes, data=form)
            assert granted.status == 200, str(granted)
            form = {"grant_type": "refresh_token", "refresh_token": granted.json()["refresh_token"]}
            refreshed = await call(gateway, "refresh", "POST", TOKEN, outcomes, data=form)
            assert refreshed.status == 200, str(refreshed)
            me = await call(
                gateway, "me", "GET", ME, outcomes, headers=bearer(refreshed.json()["access_token"])
            )
            assert me.status == 200 and me.json()["id"] == innocent.id, str(me)
            # Login throttling, per process in memory: straight to one instance.
            wrong = {"grant_type": "password", "username": victim.email, "password": "wrong password!"}
            for attempt in range(5):
                refused = await call(direct, "password", "POST", auth0 + TOKEN, outcomes, data=wrong)
                assert refused.status == 400 and refused.json()["error"] == "invalid_grant", (
                    attempt,
                    str(refused),
                )
            throttled = await call(direct, "password", "POST", auth0 + TOKEN, outcomes, data=wrong)
            assert throttled.status == 429 and int(throttled.retry_after or 0) >= 1, str(throttled)
            # ... and a right password is not locked out by the outage.
            wrong_innocent = {
                **form,
                "grant_type": "password",
                "username": innocent.email,
                "password": "nope nope!",
            }
            wrong_innocent.pop("refresh_token")
            for _ in range(2):
                refused = await call(direct, "password", "POST", auth0 + TOKEN, outcomes, data=wrong_innocent)
                assert refused.status == 400, str(refused)
            right = {"grant_type": "password", "username": innocent.email, "password": PASSWORD}
            granted = await call(direct, "password", "POST", auth0 + TOKEN, outcomes, data=right)
            assert granted.status == 200, str(granted)
            assert await _fallback_count(direct, auth0) > fallbacks_before
        finally:
            faults.redis.restore()
        slowest = max(o.elapsed for o in outcomes)
        print(f"\nredis: {len(outcomes)} requests during the outage, slowest {slowest:.2f} s")
        assert not [o for o in outcomes if o.status is None or o.status >= 500], outcomes

        await eventually(lambda: all_ready(faults), seconds=10, what="ready again after Redis is back")
        # The throttle counts in Redis again at once.
        wrong = {"grant_type": "password", "username": writer.email, "password": "wrong password!"}
        assert (await call(direct, "password", "POST", auth0 + TOKEN, data=wrong)).status == 400
        assert faults.redis_keys("login-fail:"), "the throttle does not use Redis again"

        # The cache is used again (after its breaker): a lookup leaves its entry.
        async def cached_again() -> bool:
            probe = unique_email("rd-probe").lower()
            assert (await lookup_code(gateway, probe)).status == 404
            return bool(faults.redis_keys(probe))

        await eventually(cached_again, seconds=10, poll=0.5, what="the code cache used again")
        # The code deleted during the outage is refused, whatever the cache held.
        gone = await lookup_code(gateway, doomed.email)
        assert gone.status == 404, f"a code deleted during the outage is still served: {gone}"
        late = await call(
            gateway, "signup", "POST", SIGNUP, json=signup_body(unique_email("rd-late"), doomed_code)
        )
        assert late.status in (404, 410), f"a signup with a code deleted during the outage: {late}"
        assert_writes_whole(faults)


# --- 3. The referral service down ------------------------------------------------------------------


async def test_links_accepted_while_the_referral_service_is_down_arrive_once(faults: FaultStack) -> None:
    n = 6
    async with bounded_client(faults.gateway_url, seconds=HUNTER_TIMEOUT + MARGIN + 1) as gateway:
        owner = await new_user(gateway, "out-owner")
        code = await new_code(gateway, owner)
        emails = [unique_email(f"out-{i}") for i in range(n)]
        # The signups pass the code check, then wait on the email verifier while the service stops.
        faults.vendor.hold()
        try:
            signups = [
                asyncio.create_task(call(gateway, "signup", "POST", SIGNUP, json=signup_body(email, code)))
                for email in emails
            ]
            await eventually(
                lambda: faults.vendor.waiting >= n, seconds=5, poll=0.02, what="signups past the code check"
            )
            started = time.monotonic()
            await asyncio.to_thread(faults.referral.stop)
            stopped_in = time.monotonic() - started
        finally:
            faults.vendor.release()
        try:
            outcomes = await asyncio.gather(*signups)
            for outcome in outcomes:
                assert outcome.status == 201 and outcome.json()["user"]["referrer_id"] == owner.id, str(
                    outcome
                )
            ids = [o.json()["user"]["id"] for o in outcomes]
            # While it is down, a new signup with a code cannot be checked: 503, and nothing is written.
            refused_email = unique_email("out-refused")
            refused = await call(gateway, "signup", "POST", SIGNUP, json=signup_body(refused_email, code))
            assert_unavailable(refused)
            assert not user_ids(faults, [refused_email])
            pending = faults.query(
                "SELECT count(*) FROM auth.referral_outbox"
                " WHERE referral_id = ANY(%s::uuid[]) AND delivered_at IS NULL",
                (ids,),
            )[0][0]
            assert pending == n, f"only {pending} of {n} links wait for the referral service"
            assert not linked(faults, ids)
        finally:
            await asyncio.to_thread(faults.referral.start)
            await asyncio.to_thread(faults.referral.wait_healthy, time.monotonic() + START_TIMEOUT)

    def all_arrived() -> dict[str, tuple[str, int]] | None:
        links = linked(faults, ids)
        return links if len(links) == n else None

    links = wait_until(all_arrived, seconds=10, what="every link delivered after the restart")
    assert all(referrer == owner.id and count == 1 for referrer, count in links.values()), links

    def outbox() -> list[tuple[Any, ...]] | None:
        rows = faults.query(
            "SELECT attempts, failed_at IS NULL FROM auth.referral_outbox"
            " WHERE referral_id = ANY(%s::uuid[]) AND delivered_at IS NOT NULL",
            (ids,),
        )
        return rows if len(rows) == n else None

    rows = wait_until(outbox, seconds=5, what="every outbox row marked delivered")
    # Each was tried at the signup, failed, and was delivered by the relay later; none failed for good.
    assert all(attempts >= 2 and not_failed for attempts, not_failed in rows), rows
    print(f"\noutbox: referral service stopped in {stopped_in:.2f} s; {n} links delivered after its restart")


# --- 4. Third parties that hang -------------------------------------------------------------------


async def test_hung_third_parties_cost_at_most_their_timeout(faults: FaultStack) -> None:
    accepted_before = faults.blackhole.accepted
    async with bounded_client(faults.gateway_url, seconds=HUNTER_TIMEOUT + MARGIN) as gateway:
        # Hunter accepts the call and never answers: the signup goes on unchecked after its timeout.
        faults.vendor.hold()
        try:
            email = unique_email("hung-hunter")
            signed = await call(gateway, "signup", "POST", SIGNUP, json=signup_body(email))
        finally:
            faults.vendor.release()
        assert signed.status == 201, str(signed)
        assert HUNTER_TIMEOUT - 0.1 <= signed.elapsed <= HUNTER_TIMEOUT + MARGIN, signed.elapsed
        me = await call(gateway, "me", "GET", ME, headers=bearer(signed.json()["access_token"]))
        check = me.json()["email_check"]
        assert check["status"] == "unchecked" and check["reason"] == "timeout", check
        hunter_elapsed = signed.elapsed

        # The enrichment vendor never answers: the proof of the address (which starts the enrichment)
        # does not wait for it, the profile says so later.
        email = unique_email("hung-enrich")
        mailbox = Mailbox(harness_smtp().mail_dir)
        signed = await call(gateway, "signup", "POST", SIGNUP, json=signup_body(email))
        assert signed.status == 201, str(signed)
        headers = bearer(signed.json()["access_token"])
        proof = await mailbox.token(email, "verify-email")
        verified = await call(gateway, "verify", "POST", f"{AUTH_API}/email/verify", json={"token": proof})
        assert verified.status == 200 and verified.elapsed < ENRICHMENT_TIMEOUT, str(verified)
        started = time.monotonic()

        async def profile() -> Any:
            return (await call(gateway, "me", "GET", ME, headers=headers)).json()["profile"]

        stored = await eventually(
            profile, seconds=ENRICHMENT_TIMEOUT + MARGIN + 1, what="the enrichment outcome"
        )
        assert stored["status"] == "unavailable" and stored["reason"] == "timeout", stored
        enrich_elapsed = time.monotonic() - started

        # An OpenID Connect issuer that never answers discovery: authorize gives up within its timeout.
        hung = await call(gateway, "authorize", "GET", f"{AUTH_API}/oauth/hung/authorize")
        assert hung.elapsed <= OIDC_TIMEOUT + MARGIN, str(hung)
        assert hung.status == 400 and hung.json()["code"] == "oauth_failed", str(hung)
        # A provider whose token endpoint never answers: the callback gives up within its timeout.
        begun = await call(gateway, "authorize", "GET", f"{AUTH_API}/oauth/slow/authorize")
        assert begun.status == 302, str(begun)
        location = begun.location
        assert location.startswith(faults.vendor.oidc_issuer + "/authorize?"), location
        state = dict(part.split("=", 1) for part in urlsplit(location).query.split("&"))["state"]
        finished = await call(
            gateway,
            "callback",
            "GET",
            f"{AUTH_API}/oauth/slow/callback",
            params={"code": "x", "state": state},
        )
        assert finished.elapsed <= OIDC_TIMEOUT + MARGIN, str(finished)
        assert finished.status == 400 and finished.json()["code"] == "oauth_failed", str(finished)
        assert not faults.query("SELECT 1 FROM auth.identities WHERE provider IN ('hung', 'slow')")
    assert faults.blackhole.accepted >= accepted_before + 3  # enrichment, discovery, token: really called
    print(
        f"\nthird parties: hung Hunter {hunter_elapsed:.2f} s,"
        f" enrichment stored after {enrich_elapsed:.2f} s,"
        f" hung discovery {hung.elapsed:.2f} s, hung token endpoint {finished.elapsed:.2f} s"
    )
